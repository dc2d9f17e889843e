"""The harness of the bad-input tables (tests/test_bad_input*.py): every case exits 2 with one
``error: ...`` line that names the offending thing, prints no traceback, is decided before Ray
starts when the input allows it, and leaves nothing behind (no MLflow store or run, no cache entry,
no Tune state, no output or temporary file).

Each case is a function ``(w: Work) -> (argv, names)`` that prepares its input under the test's
working directory and returns the CLI arguments and the strings the error line must contain.
A :class:`Cases` table holds ``(make, cli, stage)``: cli is ``run`` (``python -m search.run``) or
``infer`` (``python -m methods.infer``), run in-process; stage ``pre-ray`` replaces Ray's start by
a sentinel that fails the test if reached; ``ray`` runs on the session Ray (only the cluster knows
its resources) and ``ray-task`` too (an error raised inside a Ray task: its parent run then ends
FAILED, never RUNNING or FINISHED).
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from methods.infer import main as infer_main
from search.run import main as run_main


class Cases:
    """One table of cases: ``@table.case(name, cli, stage)`` on a case function registers it;
    ``table.params`` is what ``pytest.mark.parametrize("make, cli, stage", ...)`` takes."""

    def __init__(self):
        self.params: list = []

    def case(self, name: str, cli: str = "run", stage: str = "pre-ray"):
        def deco(fn):
            self.params.append(pytest.param(fn, cli, stage, id=name))
            return fn
        return deco

    def flags(self, name: str, *extra: str, names: tuple[str, ...]):
        """A case that is the toy search on the shared VOC copy plus ``extra`` flags."""
        self.case(name)(lambda w: (w.toy(*extra), names))


@dataclass
class Work:
    dir: Path
    voc_src: Path
    monkeypatch: pytest.MonkeyPatch
    _voc: Path | None = field(default=None)

    def voc(self) -> Path:
        """A private, writable copy of the generated VOC data set (8 images)."""
        if self._voc is None:
            self._voc = self.dir / "voc"
            shutil.copytree(self.voc_src, self._voc)
        return self._voc

    def toy(self, *extra: str, root: Path | None = None) -> list[str]:
        return ["--method", "toy", "--dataset", "voc21", "--data-root",
                str(root or self.voc_src), "--num-samples", "2", *extra]

    def image(self, i: int = 0) -> Path:
        return sorted((self.voc() / "JPEGImages").iterdir())[i]

    def label(self, i: int = 0) -> Path:
        return sorted((self.voc() / "SegmentationClass").iterdir())[i]

    def split_file(self) -> Path:
        return self.voc() / "ImageSets" / "Segmentation" / "val.txt"

    def config(self, **changes) -> Path:
        """A tuned toy config (as search.export writes it), with ``changes`` applied."""
        config = {"method": "toy", "backbone": {"name": "tiny"}, "settings": {},
                  "params": {"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 1}}
        for k, v in changes.items():
            if k.startswith("params_"):
                knob = k.removeprefix("params_")
                if v is None:
                    config["params"].pop(knob)
                else:
                    config["params"][knob] = v
            else:
                config[k] = v
        path = self.dir / "tuned.yaml"
        import yaml

        path.write_text(yaml.safe_dump(config))
        return path

    def infer(self, *extra: str, image: Path | None = None, config: Path | None = None,
              classes: str = "cat,dog") -> list[str]:
        image = image or self.voc_src / "JPEGImages" / sorted(
            os.listdir(self.voc_src / "JPEGImages"))[0]
        return ["--config", str(config or self.config()), "--image", str(image),
                "--classes", classes, "--out", str(self.dir / "out.png"), *extra]


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit grey PNG of zeros of ``width x height``, a few hundred KB on disk (what a
    decompression bomb looks like), written row by row so the test never holds the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


class RayStarted(BaseException):
    """Raised where Ray would start: not an OvssError, so main() cannot swallow it."""


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def runs(workdir: Path):
    db = workdir / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


def check_case(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request) -> None:
    """Run one case (module docstring) and check what it printed and left behind."""
    import search.engine.session

    w = Work(workdir, voc_root, monkeypatch)
    argv, names = make(w)
    if stage != "pre-ray":
        request.getfixturevalue("ray_session")
    else:
        def no_ray(address):
            raise RayStarted("Ray was started for an input that could be refused before")

        monkeypatch.setattr(search.engine.session, "init_ray", no_ray)
    capsys.readouterr()
    before = files(workdir)
    try:
        code = (run_main if cli == "run" else infer_main)(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    if stage == "pre-ray":
        assert len(lines) == 1, err   # nothing else was printed: nothing else was started
    for name in names:
        assert name in errors[0], (name, errors[0])

    new = files(workdir) - before
    assert not [f for f in new if ".tmp" in f or f.endswith(("out.png", "_overlay.png"))], new
    found = runs(workdir)
    assert not [r for r in found if r.info.status in ("RUNNING", "FINISHED")], found
    if stage == "ray-task":
        # Found only inside a Ray task, after the parent run began: the parent ends FAILED,
        # and only the images that could be read have (complete) cache entries.
        assert [r.info.status for r in found] == ["FAILED"]
        entries = [p for p in (workdir / "cache").rglob("*.safetensors")]
        assert len(entries) < 8
    else:
        assert not new, new  # no MLflow store, cache, Tune state or output
