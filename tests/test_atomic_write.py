"""methods.io.atomic_write: the one way a file a user keeps reaches the disk (issue #9, item 7).

A failure mid-write (or just before the rename) leaves the old file as it was and no temporary
file; modes follow the umask; ``overwrite=False`` is write-once. The user-facing writers (export,
inference label map and overlay, image-label lists) go through it, and a scan of the source finds
no other write of a user file.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import methods.io as mio
from methods.io import atomic_write

REPO = Path(__file__).resolve().parent.parent


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("data,want", [(b"\x00\x01new", b"\x00\x01new"), ("néw", "néw".encode()),
                                       (lambda f: f.write(b"by a function"), b"by a function")])
def test_writes_bytes_text_and_functions(tmp_path, data, want):
    path = tmp_path / "sub" / "out.bin"
    assert atomic_write(path, data) is True
    assert path.read_bytes() == want and _listing(path.parent) == ["out.bin"]


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.yaml"
    path.write_text("old: 1\n")

    def half_then_fail(f):
        f.write(b"new: ")
        f.flush()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old: 1\n" and _listing(tmp_path) == ["keep.yaml"]


def test_a_failure_just_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.yaml"
    path.write_text("old: 1\n")
    seen = []

    def crash(tmp, final):
        seen.append(tmp.read_bytes())                  # the whole new file, not yet published
        raise KeyboardInterrupt

    monkeypatch.setattr(mio, "_before_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new: 2\n")
    assert seen == [b"new: 2\n"]
    assert path.read_text() == "old: 1\n" and _listing(tmp_path) == ["keep.yaml"]


def test_write_once_keeps_the_first_file(tmp_path):
    path = tmp_path / "entry"
    assert atomic_write(path, b"first", overwrite=False) is True
    assert atomic_write(path, b"second", overwrite=False) is False
    assert path.read_bytes() == b"first" and _listing(tmp_path) == ["entry"]
    assert atomic_write(path, b"third") is True and path.read_bytes() == b"third"


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        path = tmp_path / "new" / "f.png"
        atomic_write(path, b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE(path.parent.stat().st_mode) == dir_mode


# --- the user-facing writers go through it ----------------------------------------------------

@pytest.fixture
def crash_before_publish(monkeypatch):
    def crash(tmp, final):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(mio, "_before_publish", crash)


def test_inference_outputs_are_atomic(tmp_path, monkeypatch):
    from PIL import Image

    from methods.infer import save_label_map, save_png

    out = tmp_path / "pred.png"
    save_label_map(np.array([[0, 1], [2, 300]]), out)
    assert np.array_equal(np.array(Image.open(out)), [[0, 1], [2, 300]])
    before = out.read_bytes()
    monkeypatch.setattr(mio, "_before_publish", lambda t, f: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save_label_map(np.zeros((2, 2), np.int64), out)
    with pytest.raises(OSError):
        save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "pred_overlay.png")
    assert out.read_bytes() == before and _listing(tmp_path) == ["pred.png"]


def test_image_labels_file_is_atomic(tmp_path, voc_root, crash_before_publish):
    from search.data import open_dataset, write_image_labels

    data = open_dataset("voc21", voc_root)
    out = tmp_path / "labels.json"
    out.write_text("{}\n")
    with pytest.raises(OSError, match="simulated"):
        write_image_labels(data, out)
    assert out.read_text() == "{}\n" and _listing(tmp_path) == ["labels.json"]


def test_export_is_atomic_and_never_replaces_without_force(workdir, monkeypatch):
    import yaml
    from mlflow.tracking import MlflowClient

    from search.record.export import export
    from search.record.tracking import TAG_ROLE

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("toy/tiny/voc21")
    run = client.create_run(exp, tags={TAG_ROLE: "search", "ovss_method": "toy"})
    cfg = workdir / "best_config.yaml"
    cfg.write_text(yaml.safe_dump({"method": "toy", "backbone_name": "tiny",
                                   "dataset": "voc21", "params": {"temp": 0.5}}))
    client.log_artifact(run.info.run_id, str(cfg))
    client.set_terminated(run.info.run_id, "FINISHED")
    out_dir = workdir / "tuned"
    out = export("toy", tracking_uri=uri, out=out_dir / "t.yaml")
    assert yaml.safe_load(out.read_text())["params"] == {"temp": 0.5}
    out.write_text("mine: true\n")
    from methods.base import OvssError

    with pytest.raises(OvssError, match="--force"):
        export("toy", tracking_uri=uri, out=out)
    monkeypatch.setattr(mio, "_before_publish",
                        lambda t, f: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        export("toy", tracking_uri=uri, out=out, force=True)
    assert out.read_text() == "mine: true\n" and _listing(out_dir) == ["t.yaml"]
    monkeypatch.setattr(mio, "_before_publish", None)
    export("toy", tracking_uri=uri, out=out, force=True)
    assert "exported_from" in out.read_text()


# --- no other write of a user file --------------------------------------------------------------

#: Calls that write files, by name.
_WRITERS = {"write_text", "write_bytes", "savefig", "save", "save_file", "mkstemp", "tofile",
            "imwrite", "save_pretrained", "savez", "savez_compressed"}
#: Renames (``os.replace(a, b)`` or ``Path.replace(b)``, not ``str.replace(a, b)``).
_RENAMES = {"replace", "rename", "link", "renames"}
#: ``json.dump(obj, f)`` / ``yaml.safe_dump(obj, f)``: a write when given a stream.
_DUMPS = {"dump", "safe_dump"}
#: (file, enclosing function) -> why this write is not of a file a user keeps (or is the helper).
ALLOWED = {
    ("methods/io.py", "atomic_write"): "the helper itself",
    ("methods/infer.py", "<lambda>"): "PIL writes into the file object atomic_write hands it",
    ("search/engine/pareto.py", "<lambda>"):
        "matplotlib writes into the file object atomic_write hands it",
    ("bench/worker_rss.py", "<lambda>"): "torch.save into the file object atomic_write hands it",
    ("search/core/cache.py", "_discard"): "renames a damaged entry aside to remove it safely",
    ("search/engine/outputs.py", "log_search_outputs"):
        "a TemporaryDirectory, logged as an MLflow artifact",
    ("search/engine/outputs.py", "_plots"): "a TemporaryDirectory, logged as an MLflow artifact",
    ("search/engine/search.py", "_log_plan"): "a TemporaryDirectory, logged as an MLflow artifact",
    ("rewards/fidelity.py", "scatter_plot"): "called with a TemporaryDirectory (outputs._fidelity)",
    ("search/data/synthetic.py", "_write"): "a private temporary directory, renamed whole",
    ("search/data/synthetic.py", "make_dataset"): "renames that directory into place at once",
    ("methods/open_clip_backbone.py", "register_config"):
        "a model config in a TemporaryDirectory, gone once open_clip has read it",
    ("bench/search.py", "main"): "a random-weight checkpoint in the bench's temporary directory",
    ("bench/toy_blip_train.py", "save_model"): "a private temporary directory, renamed whole",
    ("search/engine/backbones.py", "run_backbones"):
        "a TemporaryDirectory, logged as an MLflow artifact",
    ("search/record/tables.py", "write_table"):
        "called with a TemporaryDirectory (evaluate, holdout)",
    ("search/engine/overlays.py", "write_overlays"): "called with a TemporaryDirectory (evaluate)",
    ("search/record/model.py", "encode_image"): "PNG bytes into an in-memory buffer",
    ("search/record/model.py", "log_tuned_model"):
        "a TemporaryDirectory, logged as an MLflow model",
    ("search/engine/rerank.py", "proxy_context"): "dataclasses.replace, not a file",
    ("search/engine/rerank.py", "rescore"): "dataclasses.replace, not a file",
    ("search/core/trial.py", "on_worker_device"): "dataclasses.replace, not a file",
    ("search/engine/rerank.py", "rerank"): "a TemporaryDirectory, logged as an MLflow artifact",
    ("search/engine/transfer.py", "heatmap"): "called with a TemporaryDirectory (transfer)",
    ("search/engine/transfer.py", "transfer"): "a TemporaryDirectory, logged as an MLflow artifact",
    ("search/core/preflight.py", "check_nodes_see_inputs"): "a probe file, removed right after",
}


def _write_calls(path: Path):
    """(enclosing function, line, what) of every call in ``path`` that may write a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, func):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node.name
        elif isinstance(node, ast.Lambda):
            func = "<lambda>"
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            on_os = isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "os"
            if name in _WRITERS or (name in _RENAMES and (on_os or len(node.args) == 1)) or \
                    (name in _DUMPS and len(node.args) + len(node.keywords) >= 2
                     and (len(node.args) >= 2 or any(k.arg == "stream" for k in node.keywords))):
                found.append((func, node.lineno, name))
            elif name in ("open", "fdopen"):
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+"):
                    found.append((func, node.lineno, f"{name}({mode.value!r})"))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_every_user_file_write_goes_through_atomic_write():
    stray, used = [], set()
    for top in ("methods", "search", "rewards", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for func, line, what in _write_calls(path):
                if (rel, func) in ALLOWED:
                    used.add((rel, func))
                elif rel == "methods/io.py" and what.startswith("fdopen"):
                    continue                     # atomic_write's own temporary file
                else:
                    stray.append(f"{rel}:{line} {func}: {what}")
    assert stray == [], "write a user file with methods.io.atomic_write:\n" + "\n".join(stray)
    assert used == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - used}"


def test_the_scan_finds_a_plain_write(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, yaml\n"
                   "def export(p, s):\n    p.write_text(s)\n    open(p, 'w')\n"
                   "    s.replace('a', 'b')\n    os.replace(s, p)\n    yaml.safe_dump(s)\n"
                   "    yaml.safe_dump(s, p)\n    open(p)\n")
    assert [(f, w) for f, _, w in _write_calls(bad)] == [
        ("export", "write_text"), ("export", "open('w')"), ("export", "replace"),
        ("export", "safe_dump")]
