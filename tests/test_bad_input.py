"""Bad input, one table: every case exits 2 with one ``error: ...`` line that names the offending
thing, prints no traceback, is decided before Ray starts when the input allows it, and leaves
nothing behind (no MLflow store or run, no cache entry, no Tune state, no output or temporary file).

Each case is a function ``(w: Work) -> (argv, names)`` that prepares its input under the test's
working directory and returns the CLI arguments and the strings the error line must contain.
``CASES`` holds ``(make, cli, stage)``: cli is ``run`` (``python -m search.run``) or ``infer``
(``python -m methods.infer``), run in-process; stage ``pre-ray`` replaces Ray's start by a
sentinel that fails the test if reached; ``ray`` runs on the session Ray (only the cluster knows
its resources) and ``ray-task`` too (an error raised inside a Ray task: its parent run then ends
FAILED, never RUNNING or FINISHED).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from methods.base import OvssError
from methods.infer import main as infer_main
from search.run import main as run_main

CASES: list = []


def case(name: str, cli: str = "run", stage: str = "pre-ray"):
    def deco(fn):
        CASES.append(pytest.param(fn, cli, stage, id=name))
        return fn
    return deco


def flags(name: str, *extra: str, names: tuple[str, ...]):
    """A case that is the toy search on the shared VOC copy plus ``extra`` flags."""
    case(name)(lambda w: (w.toy(*extra), names))


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


# --- numeric flags of python -m search.run ------------------------------------------------------
flags("num-samples-0", "--num-samples", "0", names=("--num-samples 0",))
flags("num-samples-negative", "--num-samples", "-3", names=("--num-samples -3",))
flags("num-samples-not-int", "--num-samples", "many", names=("--num-samples", "'many'"))
flags("max-images-0", "--max-images", "0", names=("--max-images 0",))
flags("max-images-negative", "--max-images", "-1", names=("--max-images -1",))
flags("rungs-0", "--rungs", "0", names=("--rungs 0",))
flags("rungs-negative", "--rungs", "-2", names=("--rungs -2",))
flags("cpus-per-trial-0", "--cpus-per-trial", "0", names=("--cpus-per-trial 0",))
flags("cpus-per-trial-negative", "--cpus-per-trial", "-1", names=("--cpus-per-trial -1",))
flags("cpus-per-trial-nan", "--cpus-per-trial", "nan", names=("--cpus-per-trial nan",))
flags("cpus-per-trial-too-fine", "--cpus-per-trial", "0.00001",
      names=("--cpus-per-trial 1e-05",))
flags("gpus-per-trial-negative", "--gpus-per-trial", "-1", names=("--gpus-per-trial -1",))
flags("gpus-per-trial-inf", "--gpus-per-trial", "inf", names=("--gpus-per-trial inf",))
flags("max-concurrent-0", "--max-concurrent", "0", names=("--max-concurrent 0",))
flags("max-concurrent-negative", "--max-concurrent", "-2", names=("--max-concurrent -2",))
flags("seed-negative", "--seed", "-1", names=("--seed -1",))
flags("seed-too-large", "--seed", str(2 ** 32), names=(f"--seed {2 ** 32}",))

# --- --set: wrong type, outside the knob's space, unknown key -----------------------------------
flags("set-fixed-knob-not-a-number", "--set", "temp=abc", names=("temp", "'abc'", "number"))
flags("set-fixed-int-knob-fraction", "--set", "pool=1.5", names=("pool", "integer"))
flags("set-fixed-knob-outside-space", "--set", "pool=7", names=("pool=7", "[0, 2]"))
flags("set-fixed-knob-bool", "--set", "thr=true", names=("thr", "number"))
flags("set-fixed-categorical-unknown", "--set", "mode=cubic", names=("mode", "cubic",
                                                                     "linear, square"))
flags("set-space-low-above-high", "--set", "space.temp.low=5",
      names=("space.temp.low", "low 5.0 is above high 1.0"))
flags("set-space-low-not-a-number", "--set", "space.temp.low=abc",
      names=("space.temp.low", "valid number"))
flags("set-space-step-0", "--set", "space.pool.step=0", names=("space.pool.step", "step 0"))
flags("set-space-log-low-negative", "--set", "space.temp.low=-1",
      names=("space.temp.low", "log scale"))
flags("set-space-no-choices", "--set", "space.mode.choices=[]",
      names=("space.mode.choices", "at least 1"))
flags("set-space-unknown-field", "--set", "space.pool.bogus=1", names=("space.pool.bogus",
                                                                       "'bogus'"))
flags("set-space-unknown-knob", "--set", "space.nosuch.low=1", names=("'space.nosuch.low'",))
flags("set-unknown-knob", "--set", "tua=6", names=("'tua'",))
flags("set-without-value", "--set", "temp", names=("'temp'", "key=value"))
flags("set-unknown-setting", "--set", "settings.nosuch=1", names=("'settings.nosuch'",))
flags("set-setting-wrong-type", "--set", "settings.seed=abc", names=("settings.seed",
                                                                     "integer"))
flags("set-backbone-unknown-field", "--set", "backbone.nosuch=1", names=("backbone.nosuch",
                                                                         "path"))
flags("set-backbone-name", "--set", "backbone.name=other", names=("backbone.name",
                                                                  "--backbone"))

# --- unknown and malformed names -----------------------------------------------------------------
flags("unknown-backbone", "--backbone", "vit-z", names=("'vit-z'", "tiny, other"))
flags("unknown-split", "--split", "nosplit", names=("'nosplit'", "val, train"))
flags("unknown-reward-backbone", "--reward", "clip", "--reward-backbone", "nope",
      names=("--reward-backbone", "'nope'"))
flags("unknown-reward", "--reward", "dice", names=("--reward", "'dice'"))
flags("unknown-preset", "--preset", "huge", names=("--preset", "'huge'"))
flags("malformed-name", "--name", "../evil", names=("--name", "'../evil'"))
flags("unknown-tracking-scheme", "--tracking-uri", "bogus://x/y", names=("bogus://x/y",
                                                                         "'bogus'"))
flags("resume-never-ran", "--resume", "--name", "never-ran", names=("--resume", "'never-ran'"))


@case("unknown-method")
def _(w):
    return ["--method", "nosuch", "--dataset", "voc21", "--data-root", str(w.voc_src)], (
        "--method", "'nosuch'")


@case("unknown-dataset")
def _(w):
    return ["--method", "toy", "--dataset", "pascal99", "--data-root", str(w.voc_src)], (
        "'pascal99'",)


@case("malformed-dataset-name")
def _(w):
    return ["--method", "toy", "--dataset", "../voc21", "--data-root", str(w.voc_src)], (
        "'../voc21'",)


@case("missing-data-root")
def _(w):
    return w.toy(root=w.dir / "nowhere"), ("nowhere", "does not exist")


@case("cache-dir-is-a-file")
def _(w):
    (w.dir / "cachefile").write_text("x")
    return w.toy("--cache-dir", str(w.dir / "cachefile")), ("--cache-dir", "cachefile")


# --- data sets: empty, unreadable, mislabelled, wrong size, outside the root ---------------------
@case("dataset-empty-folder")
def _(w):
    d = w.dir / "mine"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    (d / "classes.txt").write_text("background\ncat\n")
    return ["--method", "toy", "--dataset", "folder", "--data-root", str(d)], (
        "no images", str(d / "images"))


@case("dataset-empty-split-list")
def _(w):
    w.split_file().write_text("\n")
    return w.toy(root=w.voc()), ("val.txt", "lists no images")


@case("dataset-empty-class-list")
def _(w):
    d = w.dir / "mine"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "masks" / "a.png")
    (d / "classes.txt").write_text("\n")
    return ["--method", "toy", "--dataset", "folder", "--data-root", str(d)], (
        "classes.txt", "empty")


@case("dataset-image-unreadable")
def _(w):
    victim = w.image(2)
    if os.geteuid() == 0:  # root reads a mode-000 file: make the open fail as it would
        import PIL.Image

        real_open = PIL.Image.open

        def denied(fp, *a, **k):
            if Path(fp) == victim:
                raise PermissionError(13, "Permission denied", str(victim))
            return real_open(fp, *a, **k)

        w.monkeypatch.setattr(PIL.Image, "open", denied)
    else:
        victim.chmod(0)
    return w.toy(root=w.voc()), (victim.name, "Permission denied")


@case("dataset-image-corrupt")
def _(w):
    victim = w.image(1)
    victim.write_bytes(b"not a jpeg at all")
    return w.toy(root=w.voc()), (victim.name, "cannot read image")


@case("dataset-image-enormous")
def _(w):
    victim = w.image(3)
    png_bomb(victim, 10000, 10000)
    return w.toy(root=w.voc()), (victim.name, "10000x10000", "limit")


@case("dataset-image-above-env-limit")
def _(w):
    w.monkeypatch.setenv("OVSS_MAX_IMAGE_PIXELS", "5000")
    return w.toy(), ("2007_000000.jpg", "limit of 5000 pixels")


@case("dataset-label-values-outside-classes")
def _(w):
    victim = w.label(4)
    lab = Image.open(victim)
    a = np.array(lab)
    a[:2, :2] = 30  # voc21 has label values 0..20 and 255
    out = Image.fromarray(a, mode="P") if lab.mode == "P" else Image.fromarray(a)
    if lab.mode == "P":
        out.putpalette(lab.getpalette())
    out.save(victim)
    return w.toy(root=w.voc()), (victim.name, "[30]")


@case("dataset-label-wrong-size")
def _(w):
    victim = w.label(0)
    lab = Image.open(victim)
    lab.resize((lab.width + 7, lab.height)).save(victim)
    return w.toy(root=w.voc()), (victim.name, "wrong size")


@case("dataset-label-missing")
def _(w):
    victim = w.label(5)
    victim.unlink()
    return w.toy(root=w.voc()), (victim.name, "no label map")


@case("dataset-split-list-parent-path")
def _(w):
    # A readable image sits where '../outside' points: it must not be read.
    shutil.copy(w.image(0), w.voc() / "outside.jpg")
    w.split_file().write_text(w.split_file().read_text() + "../outside\n")
    return w.toy(root=w.voc()), ("'../outside'", "outside the data root")


@case("dataset-split-list-absolute-path")
def _(w):
    shutil.copy(w.image(0), w.dir / "elsewhere.jpg")
    w.split_file().write_text(f"{w.dir / 'elsewhere'}\n" + w.split_file().read_text())
    return w.toy(root=w.voc()), (str(w.dir / "elsewhere"), "outside the data root")


@case("image-labels-unknown-class")
def _(w):
    labels = w.dir / "labels.json"
    ids = [p.stem for p in sorted((w.voc_src / "JPEGImages").iterdir())]
    labels.write_text(json.dumps({i: ["cat", "unicorn"] for i in ids}))
    return w.toy("--reward", "clip", "--image-labels", str(labels)), ("labels.json",
                                                                      "'unicorn'")


@case("image-labels-not-json")
def _(w):
    labels = w.dir / "labels.json"
    labels.write_text("{not json")
    return w.toy("--reward", "clip", "--image-labels", str(labels)), ("labels.json",)


# --- methods.infer: images, tuned configs, devices, outputs --------------------------------------
@case("infer-empty-class-list", cli="infer")
def _(w):
    return w.infer(classes=" , "), ("--classes",)


@case("infer-image-corrupt", cli="infer")
def _(w):
    bad = w.dir / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    return w.infer(image=bad), ("bad.png",)


@case("infer-image-enormous", cli="infer")
def _(w):
    return w.infer(image=png_bomb(w.dir / "huge.png", 10000, 10000)), ("huge.png",
                                                                      "10000x10000", "limit")


@case("infer-config-missing-knob", cli="infer")
def _(w):
    return w.infer(config=w.config(params_thr=None)), ("tuned.yaml", "thr")


@case("infer-config-of-another-method", cli="infer")
def _(w):  # clipseg knobs under method toy
    return w.infer(config=w.config(params={"layer": 5, "tau": 6.0, "epsilon": 0.75})), (
        "tuned.yaml", "temp, thr, mode, pool", "toy")


@case("infer-config-names-another-method", cli="infer")
def _(w):  # toy knobs under method clipseg: refused before any weights load
    return w.infer(config=w.config(method="clipseg")), ("tuned.yaml", "clipseg")


@case("infer-config-extra-knob", cli="infer")
def _(w):
    return w.infer(config=w.config(params_tau=6.0)), ("tuned.yaml", "tau")


@case("infer-config-knob-wrong-type", cli="infer")
def _(w):
    return w.infer(config=w.config(params_temp="abc")), ("params.temp", "'abc'")


@case("infer-config-unknown-method", cli="infer")
def _(w):
    return w.infer(config=w.config(method="nosuch")), ("'nosuch'",)


@case("infer-config-missing-file", cli="infer")
def _(w):
    return w.infer(config=w.dir / "gone.yaml"), ("gone.yaml", "not found")


@case("infer-config-not-a-mapping", cli="infer")
def _(w):
    (w.dir / "list.yaml").write_text("- 1\n- 2\n")
    return w.infer(config=w.dir / "list.yaml"), ("list.yaml", "mapping")


@case("infer-device-cuda-without-gpu", cli="infer")
def _(w):
    import torch

    w.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return w.infer("--device", "cuda"), ("--device cuda", "no CUDA GPU")


@case("infer-device-index-not-there", cli="infer")
def _(w):
    return w.infer("--device", "cuda:64"), ("--device cuda:64",)


@case("infer-device-unknown", cli="infer")
def _(w):
    return w.infer("--device", "tpu"), ("'tpu'",)


@case("infer-out-is-a-directory", cli="infer")
def _(w):
    args = w.infer()
    args[args.index("--out") + 1] = str(w.dir)
    return args, ("--out", str(w.dir))


@case("infer-out-not-png", cli="infer")
def _(w):
    args = w.infer()
    args[args.index("--out") + 1] = str(w.dir / "out.jpg")
    return args, ("out.jpg", ".png")


@case("infer-missing-flag", cli="infer")
def _(w):
    return ["--image", "x.png"], ("--config",)


# --- only Ray can tell: the cluster's resources, errors raised inside Ray tasks ------------------
@case("gpus-per-trial-cluster-without-gpus", stage="ray")
def _(w):
    return w.toy("--gpus-per-trial", "64"), ("--gpus-per-trial 64", "GPU")


@case("error-inside-extraction-task", stage="ray-task")
def _(w):
    # The image is damaged after planning (another node's copy, a file being rewritten): the
    # extraction task's OvssError reaches the user as its one line, not the remote traceback.
    import search.run

    victim = w.image(0)
    plan_search = search.run.plan_search

    def plan_then_damage(args):
        plan = plan_search(args)
        victim.write_bytes(b"damaged")
        return plan

    w.monkeypatch.setattr(search.run, "plan_search", plan_then_damage)
    return w.toy("--cache-dir", str(w.dir / "cache"), root=w.voc()), (victim.name,
                                                                      "cannot read image")


class RayStarted(BaseException):
    """Raised where Ray would start: not an OvssError, so main() cannot swallow it."""


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _runs(workdir: Path):
    db = workdir / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({p.id for p in CASES}) == len(CASES)


@pytest.mark.parametrize("make, cli, stage", CASES)
def test_bad_input(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request):
    import search.orchestrate

    w = Work(workdir, voc_root, monkeypatch)
    argv, names = make(w)
    if stage != "pre-ray":
        request.getfixturevalue("ray_session")
    else:
        def no_ray(address):
            raise RayStarted("Ray was started for an input that could be refused before")

        monkeypatch.setattr(search.orchestrate, "init_ray", no_ray)
    capsys.readouterr()
    before = _files(workdir)
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

    new = _files(workdir) - before
    assert not [f for f in new if ".tmp" in f or f.endswith(("out.png", "_overlay.png"))], new
    runs = _runs(workdir)
    assert not [r for r in runs if r.info.status in ("RUNNING", "FINISHED")], runs
    if stage == "ray-task":
        # Found only inside a Ray task, after the parent run began: the parent ends FAILED,
        # and only the images that could be read have (complete) cache entries.
        assert [r.info.status for r in runs] == ["FAILED"]
        entries = [p for p in (workdir / "cache").rglob("*.safetensors")]
        assert len(entries) < 8
    else:
        assert not new, new  # no MLflow store, cache, Tune state or output


def test_max_images_is_checked_where_the_preset_would_fill_it(workdir, monkeypatch, capsys):
    """``--max-images 0`` does not fall back to the preset's value (0 is not "unset")."""
    import search.orchestrate

    monkeypatch.setattr(search.orchestrate, "init_ray",
                        lambda a: (_ for _ in ()).throw(RayStarted()))
    assert run_main(["--method", "toy", "--preset", "smoke", "--max-images", "0"]) == 2
    assert "--max-images 0" in capsys.readouterr().err


def test_load_segmenter_refuses_a_config_lacking_a_knob(workdir, voc_root, monkeypatch):
    from methods import load_segmenter

    w = Work(workdir, voc_root, monkeypatch)
    with pytest.raises(OvssError, match="params lack knob.*pool") as e:
        load_segmenter(w.config(params_pool=None))
    assert "\n" not in str(e.value)
    assert load_segmenter(w.config()).params["pool"] == 1    # the same config, whole, loads


def test_pixel_limit_is_a_header_check(tmp_path, monkeypatch):
    """The limit is ours (below PIL's 89 MP warning), counts width x height, and an image at
    the limit still reads."""
    from methods.io import MAX_IMAGE_PIXELS, image_size, load_image

    assert MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    monkeypatch.setenv("OVSS_MAX_IMAGE_PIXELS", "600")
    assert load_image(path).shape == (20, 30, 3) and image_size(path) == (20, 30)
    monkeypatch.setenv("OVSS_MAX_IMAGE_PIXELS", "599")
    for read in (load_image, image_size):
        with pytest.raises(OvssError, match="a.png is 30x20"):
            read(path)


# --- _user_error: the OvssError inside whatever Ray wraps it in ----------------------------------
def _ray_errors():
    import ray.exceptions as E
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    user = OvssError("cannot read image x.jpg: broken")
    context = ActorDiedErrorContext(error_message="killed by the memory monitor",
                                    actor_id=b"0" * 16)
    task = E.RayTaskError("_extract_task", "Traceback ...", user)

    class Dual(E.RayTaskError):  # a dual exception whose cause attribute went missing
        def __init__(self):
            pass

        def __getattr__(self, name):
            return getattr(self.cause, name)

    chained = RuntimeError("trial failed")
    chained.__cause__ = task
    return [
        ("task-error", task, user),
        ("task-error-dual", task.as_instanceof_cause(), user),
        ("chained", chained, user),
        ("task-error-context-cause", E.RayTaskError("f", "tb", context), None),
        ("actor-died", E.ActorDiedError(context), None),
        ("out-of-memory", E.OutOfMemoryError("Task was killed due to the node running low "
                                             "on memory"), None),
        ("worker-crashed", E.WorkerCrashedError(), None),
        ("dual-without-cause", Dual(), None),
        ("not-an-exception", "error text", None),
    ]


@pytest.mark.parametrize("i", range(9))
def test_user_error_unwraps_ray_errors(i):
    from search.tune import _user_error

    name, err, want = _ray_errors()[i]
    got = _user_error(err)
    if want is None:
        assert got is None, name
    else:
        assert isinstance(got, OvssError) and str(got) == str(want), name


# --- the real CLIs: no traceback, one line --------------------------------------------------------
@pytest.mark.parametrize("module, argv, name", [
    ("search.run", ["--method", "toy", "--dataset", "voc21", "--data-root", "{voc}",
                    "--set", "temp=abc"], "temp"),
    ("methods.infer", ["--config", "{dir}/none.yaml", "--image", "{dir}/huge.png",
                       "--classes", "cat", "--out", "{dir}/o.png"], "huge.png"),
])
def test_subprocess_error_is_one_line(workdir, voc_root, module, argv, name):
    png_bomb(workdir / "huge.png", 10000, 10000)
    argv = [a.format(voc=voc_root, dir=workdir) for a in argv]
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines
    assert not (workdir / "o.png").exists() and not (workdir / "mlflow.db").exists()


def test_every_config_a_search_can_export_passes_the_tuned_config_check():
    """The positive side of the infer cases: for every shipped method and backbone, the defaults
    and 5 random points of the space (as the search exports them) are accepted."""
    from methods import METHODS
    from methods.infer import check_tuned_config
    from search.config import load_method_spec, resolve
    from search.space import full_params, sample_value

    rng = np.random.default_rng(0)
    for method in METHODS:
        spec = load_method_spec(method)
        for name in spec.backbones:
            r = resolve(spec, name)
            for _ in range(5):
                params = full_params(r.defaults, {k: sample_value(p, rng)
                                                  for k, p in r.space.items()})
                check_tuned_config({"method": method, "backbone": r.backbone,
                                    "settings": r.settings, "params": params})
