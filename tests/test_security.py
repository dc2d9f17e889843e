"""Security (issue #9): nothing we read runs code, --storage is private, servers bind 127.0.0.1.

A scan of the source for the calls that can unpickle (``torch.load`` without
``weights_only=True``, ``pickle.load``, ``np.load(allow_pickle=True)``, a transformers model
``from_pretrained`` without ``use_safetensors``, ``trust_remote_code``), then each rule checked on
real inputs: a checkpoint with only pickle weights, Tune's storage directory, the MLflow script.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from methods.base import OvssError
from methods.io import private_dir

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("methods", "search", "rewards", "bench")
#: from_pretrained of these reads JSON / text, never weights.
_NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "ImageProcessor", "Processor", "Config")


def _calls(tree):
    """(call, enclosing function node) of every call in a module."""
    out = []

    def visit(node, func):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node
        if isinstance(node, ast.Call):
            out.append((node, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, None)
    return out


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node):
    return isinstance(node, ast.Constant) and node.value is True


def _from_pretrained_kwargs_vars(func) -> set[str]:
    """Names assigned from ``pretrained_kwargs(...)`` in ``func``."""
    names = set()
    for node in ast.walk(func) if func is not None else ():
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", "") == "pretrained_kwargs":
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def unsafe_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    bad = []
    for call, func in _calls(tree):
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = getattr(f.value, "id", getattr(f.value, "attr", "")) \
            if isinstance(f, ast.Attribute) else ""
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{call.lineno}"
        if _kw(call, "trust_remote_code") is not None and \
                not (isinstance(_kw(call, "trust_remote_code"), ast.Constant)
                     and _kw(call, "trust_remote_code").value is False):
            bad.append(f"{where} trust_remote_code")
        if name == "load" and owner == "torch" and not _is_true(_kw(call, "weights_only")):
            bad.append(f"{where} torch.load without weights_only=True")
        if name == "load_checkpoint" and not _is_true(_kw(call, "weights_only")):
            bad.append(f"{where} load_checkpoint without weights_only=True")
        if name in ("load", "loads", "Unpickler") and owner in ("pickle", "dill", "cloudpickle"):
            bad.append(f"{where} {owner}.{name}")
        if name == "load" and owner in ("np", "numpy") and _is_true(_kw(call, "allow_pickle")):
            bad.append(f"{where} np.load(allow_pickle=True)")
        if name == "from_pretrained" and not owner.endswith(_NO_WEIGHTS):
            starred = {k.value.id for k in call.keywords
                       if k.arg is None and isinstance(k.value, ast.Name)}
            if _is_true(_kw(call, "use_safetensors")):
                continue
            if not starred & _from_pretrained_kwargs_vars(func):
                bad.append(f"{where} {owner}.from_pretrained without use_safetensors")
    return bad


def test_no_read_in_the_source_can_unpickle():
    bad = [b for top in SOURCES for p in sorted((REPO / top).rglob("*.py"))
           for b in unsafe_reads(p)]
    assert bad == []


def test_the_scan_finds_each_unsafe_read(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import torch, pickle, numpy as np\n"
        "def f(p, cls, AutoTokenizer):\n"
        "    torch.load(p)\n"
        "    torch.load(p, weights_only=False)\n"
        "    torch.load(p, weights_only=True)\n"
        "    pickle.load(p)\n"
        "    np.load(p, allow_pickle=True)\n"
        "    cls.from_pretrained(p)\n"
        "    cls.from_pretrained(p, use_safetensors=True)\n"
        "    AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
        "    kw = pretrained_kwargs({})\n"
        "    cls.from_pretrained(p, **kw)\n")
    got = [b.split(" ", 1)[1] for b in unsafe_reads(src)]
    assert got == ["torch.load without weights_only=True", "torch.load without weights_only=True",
                   "pickle.load", "np.load(allow_pickle=True)",
                   "cls.from_pretrained without use_safetensors", "trust_remote_code"]


def test_no_trust_remote_code_flag():
    """No flag turns remote code on (if one is ever added, it must default off)."""
    from search.run import build_parser

    assert "--trust-remote-code" not in build_parser().format_help()
    assert not build_parser().parse_args(["--method", "toy"]).__dict__.get("trust_remote_code")


# --- pickle-only weights ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_blip_dirs(tmp_path_factory):
    """The same tiny BLIP ITM model saved as safetensors and as a pickle-only checkpoint."""
    import torch

    from methods.pnp.backbone import TINY_DEFAULTS, tiny_config, tiny_tokenizer

    torch.set_num_threads(1)
    from transformers import BlipForImageTextRetrieval

    tok = tiny_tokenizer("blip")
    config = tiny_config("blip", TINY_DEFAULTS, len(tok), tok)
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config)
    root = tmp_path_factory.mktemp("blip")
    safe, pickled = root / "safe", root / "pickled"
    model.save_pretrained(safe)
    tok.save_pretrained(safe)
    pickled.mkdir()
    config.save_pretrained(pickled)
    tok.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    return safe, pickled, model


def test_pickle_only_weights_are_refused_in_one_line(tiny_blip_dirs):
    from methods.pnp.backbone import load_vlm

    _, pickled, _ = tiny_blip_dirs
    with pytest.raises(OvssError) as e:
        load_vlm({"name": "mine", "arch": "blip", "path": str(pickled)}, 0)
    msg = str(e.value)
    assert "\n" not in msg and "'mine'" in msg and "safetensors" in msg
    assert "allow_pickle_weights" in msg


def test_pickle_weights_load_only_when_allowed_and_safetensors_always(tiny_blip_dirs):
    import torch

    from methods.pnp.backbone import load_vlm

    safe, pickled, model = tiny_blip_dirs
    want = model.state_dict()["itm_head.weight"]
    for spec in ({"path": str(safe)},
                 {"path": str(pickled), "allow_pickle_weights": True},
                 {"path": str(pickled), "allow_pickle_weights": "true"}):
        vlm = load_vlm({"name": "mine", "arch": "blip", **spec}, 0)
        assert torch.equal(vlm.model.state_dict()["itm_head.weight"], want)


def test_pretrained_kwargs():
    from methods.io import pretrained_kwargs

    assert pretrained_kwargs({"model": "a/b"}) == {"use_safetensors": True}
    assert pretrained_kwargs({"model": "a/b", "revision": "v1"}) == \
        {"use_safetensors": True, "revision": "v1"}
    assert pretrained_kwargs({"path": "/x", "revision": "v1"}) == {"use_safetensors": True}
    assert pretrained_kwargs({"allow_pickle_weights": False}) == {"use_safetensors": True}
    assert pretrained_kwargs({"allow_pickle_weights": True}) == {"use_safetensors": False}


# --- Tune's storage is private ------------------------------------------------------------------

def test_private_dir_creates_tightens_and_refuses(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        new = private_dir(tmp_path / "a" / "results")
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(OvssError, match="another user"):
        private_dir(loose)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("resume", [False, True])
def test_tune_search_makes_storage_private_before_tune_reads_it(tmp_path, monkeypatch, resume):
    """The mode is checked at the moment Tune first gets the directory (restore or a new Tuner)."""
    import ray
    from ray import tune

    from search.engine.tuning import tune_search

    storage = tmp_path / "ray_results"
    seen = []

    def tune_looks(*args, **kwargs):
        seen.append(stat.S_IMODE(storage.stat().st_mode) if storage.exists() else None)
        raise _Stop

    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "1")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(tune_looks))
    monkeypatch.setattr(tune.Tuner, "__init__", tune_looks)
    space = {"temp": SimpleNamespace()}
    plan = SimpleNamespace(
        resolved=SimpleNamespace(space=space, defaults={"temp": 0.1}), storage=storage,
        name="s", num_samples=4, rungs=[1], reward={"name": "miou"},
        args=SimpleNamespace(cpus_per_trial=1.0, gpus_per_trial=0.0, max_concurrent=None,
                             resume=resume, seed=0))
    monkeypatch.setattr("search.core.space.optuna_space", lambda s: {})
    monkeypatch.setattr("search.core.space.trial0", lambda d, s: {})
    monkeypatch.setattr("ray.tune.search.optuna.OptunaSearch.__init__",
                        lambda self, *a, **k: None)
    with pytest.raises(_Stop):
        tune_search(plan, SimpleNamespace(), callback=None)
    assert seen == [0o700]


# --- servers --------------------------------------------------------------------------------------

def _run_mlflow_script(tmp_path, **env):
    """infra/mlflow-server.sh with a stand-in mlflow that prints the arguments it was given."""
    (tmp_path / "infra").mkdir()
    script = tmp_path / "infra" / "mlflow-server.sh"
    script.write_text((REPO / "infra" / "mlflow-server.sh").read_text())
    fake = tmp_path / ".venv" / "bin" / "mlflow"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(["bash", str(script)], env={**clean, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.split()


def test_mlflow_server_binds_localhost_unless_told(tmp_path):
    args = _run_mlflow_script(tmp_path)
    assert args[:5] == ["server", "--host", "127.0.0.1", "--port", "5000"]
    assert args[args.index("--app-name") + 1] == "ovss"   # the UI opens on the runs table


def test_mlflow_server_auth_is_one_variable(tmp_path):
    args = _run_mlflow_script(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_AUTH="1")
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--app-name") + 1] == "basic-auth"


def test_cluster_configs_keep_the_dashboard_on_localhost():
    text = (REPO / "infra" / "ray-cluster.yaml").read_text()
    assert "dashboard-host" in text and "0.0.0.0" not in text
    for line in text.splitlines():
        if "dashboard-host" in line:
            assert "127.0.0.1" in line, line


def test_kuberay_exposes_nothing_outside_the_cluster():
    """In a pod, servers listen on the pod network (KubeRay's RayJob submitter needs the
    dashboard there, MLflow serves the other pods); no Service leaves the cluster."""
    import yaml

    docs = [d for d in yaml.safe_load_all((REPO / "infra" / "kuberay.yaml").read_text()) if d]
    services = [d for d in docs if d.get("kind") == "Service"]
    assert services
    for svc in services:
        assert svc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", svc["metadata"]
    assert not [d for d in docs if d.get("kind") == "Ingress"]
    for d in docs:
        if d.get("kind") == "RayCluster":
            head = d["spec"]["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def test_readme_says_why_storage_is_private_and_how_to_turn_on_mlflow_auth():
    text = (REPO / "README.md").read_text()
    section = text.split("## Security", 1)[1].split("\n## ", 1)[0]
    for needle in ("0700", "unpickle", "--resume", "basic-auth", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD", "127.0.0.1"):
        assert needle in section, needle


def test_a_vision_model_with_pickle_only_weights_is_refused_unless_allowed(tmp_path):
    """clipseg's second vision model (DINO through transformers) follows the backbones' rule."""
    import torch
    from transformers import ViTConfig, ViTModel

    from methods.clipseg.vfm import load_vision

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, patch_size=8, image_size=32),
                     add_pooling_layer=False)
    safe, pickled = tmp_path / "safe", tmp_path / "pickled"
    model.save_pretrained(safe)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    entry = {"arch": "dino", "patch": 8}
    with pytest.raises(OvssError) as e:
        load_vision({"vision_models": {"mine": {**entry, "path": str(pickled)}}}, "mine")
    msg = str(e.value)
    assert "\n" not in msg and "'mine'" in msg and "safetensors" in msg
    assert "settings.vision_models.mine.allow_pickle_weights=true" in msg
    want = model.state_dict()["embeddings.patch_embeddings.projection.weight"]
    for spec in ({"path": str(safe)}, {"path": str(pickled), "allow_pickle_weights": True}):
        vm = load_vision({"vision_models": {"mine": {**entry, **spec}}}, "mine")
        got = vm.module.state_dict()["embeddings.patch_embeddings.projection.weight"]
        assert torch.equal(got, want)
