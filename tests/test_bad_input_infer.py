"""Bad input, ``methods.infer``: images, tuned configs, devices, outputs; and both real CLIs in a
subprocess. The harness and the rules every case meets: tests/bad_input.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from methods.base import OvssError
from tests.bad_input import Cases, Work, check_case, png_bomb

CASES = Cases()


# --- methods.infer: images, tuned configs, devices, outputs --------------------------------------
@CASES.case("infer-empty-class-list", cli="infer")
def _(w):
    return w.infer(classes=" , "), ("--classes",)


# --- duplicate class names ---------------------------------------------------------------------
@CASES.case("infer-class-twice", cli="infer")
def _(w):
    return w.infer(classes="cat,dog, Cat"), ("--classes", "'Cat' (name 3) repeats 'cat'")


@CASES.case("infer-background-in-classes", cli="infer")
def _(w):
    config = w.config(classes={"background": True})
    return w.infer(config=config, classes="background,cat"), ("--classes", "'background'",
                                                               "label 0")


@CASES.case("infer-present-twice", cli="infer")
def _(w):
    return w.infer("--present", "cat,cat"), ("--present", "'cat' is given twice")


@CASES.case("infer-image-corrupt", cli="infer")
def _(w):
    bad = w.dir / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    return w.infer(image=bad), ("bad.png",)


@CASES.case("infer-image-enormous", cli="infer")
def _(w):
    return w.infer(image=png_bomb(w.dir / "huge.png", 10000, 10000)), ("huge.png",
                                                                      "10000x10000", "limit")


@CASES.case("infer-config-missing-knob", cli="infer")
def _(w):
    return w.infer(config=w.config(params_thr=None)), ("tuned.yaml", "thr")


@CASES.case("infer-config-of-another-method", cli="infer")
def _(w):  # clipseg knobs under method toy
    return w.infer(config=w.config(params={"layer": 5, "tau": 6.0, "epsilon": 0.75})), (
        "tuned.yaml", "temp, thr, mode, pool", "toy")


@CASES.case("infer-config-names-another-method", cli="infer")
def _(w):  # toy knobs under method clipseg: refused before any weights load
    return w.infer(config=w.config(method="clipseg")), ("tuned.yaml", "clipseg")


@CASES.case("infer-config-extra-knob", cli="infer")
def _(w):
    return w.infer(config=w.config(params_tau=6.0)), ("tuned.yaml", "tau")


@CASES.case("infer-config-knob-wrong-type", cli="infer")
def _(w):
    return w.infer(config=w.config(params_temp="abc")), ("params.temp", "'abc'")


@CASES.case("infer-config-unknown-method", cli="infer")
def _(w):
    return w.infer(config=w.config(method="nosuch")), ("'nosuch'",)


@CASES.case("infer-config-missing-file", cli="infer")
def _(w):
    return w.infer(config=w.dir / "gone.yaml"), ("gone.yaml", "not found")


@CASES.case("infer-config-not-a-mapping", cli="infer")
def _(w):
    (w.dir / "list.yaml").write_text("- 1\n- 2\n")
    return w.infer(config=w.dir / "list.yaml"), ("list.yaml", "mapping")


@CASES.case("infer-device-cuda-without-gpu", cli="infer")
def _(w):
    import torch

    w.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return w.infer("--device", "cuda"), ("--device cuda", "no CUDA GPU")


@CASES.case("infer-device-index-not-there", cli="infer")
def _(w):
    return w.infer("--device", "cuda:64"), ("--device cuda:64",)


@CASES.case("infer-device-unknown", cli="infer")
def _(w):
    return w.infer("--device", "tpu"), ("'tpu'",)


@CASES.case("infer-out-is-a-directory", cli="infer")
def _(w):
    args = w.infer()
    args[args.index("--out") + 1] = str(w.dir)
    return args, ("--out", str(w.dir))


@CASES.case("infer-out-not-png", cli="infer")
def _(w):
    args = w.infer()
    args[args.index("--out") + 1] = str(w.dir / "out.jpg")
    return args, ("out.jpg", ".png")


@CASES.case("infer-missing-flag", cli="infer")
def _(w):
    return ["--image", "x.png"], ("--config",)


@pytest.mark.parametrize("make, cli, stage", CASES.params)
def test_bad_input(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request):
    check_case(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request)


def test_load_segmenter_refuses_a_config_lacking_a_knob(workdir, voc_root, monkeypatch):
    from methods import load_segmenter

    w = Work(workdir, voc_root, monkeypatch)
    with pytest.raises(OvssError, match="params lack knob.*pool") as e:
        load_segmenter(w.config(params_pool=None))
    assert "\n" not in str(e.value)
    assert load_segmenter(w.config()).params["pool"] == 1    # the same config, whole, loads


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
    from methods.spec import load_method_spec
    from search.core.config import resolve
    from search.core.space import full_params, sample_value

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
