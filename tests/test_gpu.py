"""The CUDA path against the CPU float32 path, for every method, tiny backbone, settings
profile and decode variant the specs declare (tests/device_cases.py).

For each profile and precision (float32; float16, the evidence a search stores), on
``DEVICE``:
- ``extract`` there gives CPU tensors equal to the CPU's within ``EVIDENCE_BOUND`` (of each
  tensor's largest magnitude), the same keys, shapes, dtypes and meta;
- ``decode`` there and on the CPU give label maps equal to the CPU float32 path's on at least
  ``LABEL_AGREEMENT`` of the pixels, for every variant; decode's float scores before the argmax
  (where a method has them, device_cases.SCORE_METHODS) lie within ``SCORE_BOUND``;
- evidence written to the cache on one device decodes on the other to the label map that
  device's own evidence gives (``CROSS_AGREEMENT``);
and ``methods.infer --device`` there agrees with ``--device cpu``; the peak GPU memory of one
extraction of a real-size model (random weights) is printed.

Marked ``gpu``. Without CUDA they skip (the reason shows in ``-ra``), unless
``OVSS_GPU_TESTS_DEVICE`` names the device: ``cpu`` runs the same comparisons CPU against CPU
(bench/device_check.sh --cpu, run by tests/test_device_check.py in CI, so they cannot rot);
``cuda`` fails when there is no CUDA device instead of skipping (the GPU machine's check).
Nothing imported here imports Ray, Optuna or MLflow (not installed on the GPU machine).
"""

from __future__ import annotations

import functools
import hashlib
import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from methods import METHODS
from methods.base import Evidence, Segmenter
from tests.device_cases import (
    PRESENT,
    SCORE_METHODS,
    evidence,
    image,
    profiles,
    scores,
    voc_classes,
)

DEVICE_ENV = "OVSS_GPU_TESTS_DEVICE"
DEVICE = os.environ.get(DEVICE_ENV, "").strip() or ("cuda" if torch.cuda.is_available() else "")

#: Largest |device - cpu| of an evidence tensor, as a share of the tensor's largest |value|
#: (same precision on both). float32: CUDA matrix products and cuDNN convolutions (TF32 is on
#: by default for convolutions) round differently from the CPU's; float16: plus one rounding.
EVIDENCE_BOUND = {"float32": 5e-3, "float16": 2e-2}
#: The same for decode's scores before the argmax, against the CPU float32 path.
SCORE_BOUND = {"float32": 5e-3, "float16": 2e-2}
#: Share of pixels whose label equals the CPU float32 path's, per label map (the contract's
#: float16 rule, tests/test_contract.py FP16_AGREEMENT, is 0.99 on the CPU alone).
LABEL_AGREEMENT = {"float32": 0.99, "float16": 0.98}
#: The same evidence decoded on the CPU and on the device.
CROSS_AGREEMENT = 0.999

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DEVICE, reason="no CUDA device here (torch.cuda.is_available() is "
                       f"False); {DEVICE_ENV}=cpu runs these comparisons CPU against CPU"),
]

#: Set (bench/device_check.sh --cpu does, unless given --all): one profile per method (the first,
#: both precisions), enough to keep the device code and these tests from rotting between GPU runs.
QUICK_ENV = "OVSS_GPU_TESTS_QUICK"
PROFILES = {p.name: p for p in profiles()}
if os.environ.get(QUICK_ENV, "").strip() not in ("", "0"):
    FIRST = {}
    for p in PROFILES.values():
        FIRST.setdefault(p.method, p)
    PROFILES = {p.name: p for p in FIRST.values()}
CASES = [f"{name}-{prec}" for name, p in PROFILES.items()
         for prec in ("float32", "float16") if prec == "float32" or p.has_float16()]


@pytest.fixture(scope="module", autouse=True)
def device_is_there():
    if DEVICE.startswith("cuda"):
        assert torch.cuda.is_available(), f"{DEVICE_ENV}={DEVICE}, but torch sees no CUDA device"


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a == b).mean())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the finite values (0 when both are all zero); inf when the
    two differ in where they are not finite (NaN, inf: a method may store them on purpose)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite].nan_to_num(),
                                                                     b[~finite].nan_to_num()):
        return float("inf")
    a, b = a[finite], b[finite]
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


@functools.cache
def segmenter(name: str, precision: str, device: str) -> Segmenter:
    return PROFILES[name].build(precision, device)


@functools.cache
def extracted(name: str, precision: str, device: str) -> Evidence:
    return segmenter(name, precision, device).extract(image(), voc_classes(), PRESENT)


def round_trip(ev: Evidence, method: str, tmp) -> Evidence:
    """``ev`` written to an evidence cache and read back by a fresh one (from the file)."""
    from search.core.cache import EvidenceCache

    key = hashlib.sha1(repr(sorted(ev.tensors)).encode() + os.urandom(8)).hexdigest()
    EvidenceCache(tmp).put(method, key, ev)
    back = EvidenceCache(tmp).get(method, key)
    assert back is not None
    return back


@dataclass
class Outcome:
    """Everything one (profile, precision) case compares, computed once."""

    base: dict[str, Evidence]                                # cpu / device: extract's evidence
    labels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # variant -> maps
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)    # variant -> why


@functools.cache
def outcome(case: str) -> Outcome:
    import tempfile

    name, precision = case.rsplit("-", 1)
    p, classes, img = PROFILES[name], voc_classes(), image()
    ref, cpu, dev = (segmenter(name, "float32", "cpu"), segmenter(name, precision, "cpu"),
                     segmenter(name, precision, DEVICE))
    ref_base = extracted(name, "float32", "cpu")
    out = Outcome({"cpu": extracted(name, precision, "cpu"),
                   "device": extracted(name, precision, DEVICE)})
    with tempfile.TemporaryDirectory(prefix="ovss-gpu-") as tmp:
        for v, params in p.variants.items():
            try:
                ref_ev = evidence(ref, img, classes, params, ref_base)
                want = ref.decode(ref_ev, params)
            except ModuleNotFoundError as e:   # e.g. pydensecrf (CPU-only) not installed here
                out.skipped[v] = str(e)
                continue
            cpu_ev = evidence(cpu, img, classes, params, out.base["cpu"])
            dev_ev = evidence(dev, img, classes, params, out.base["device"])
            out.labels[v] = {
                "reference": want,
                "device on device": dev.decode(dev_ev, params),
                "device on cpu": cpu.decode(round_trip(dev_ev, p.method, tmp), params),
                "cpu on device": dev.decode(round_trip(cpu_ev, p.method, tmp), params),
                "cpu on cpu": cpu.decode(cpu_ev, params)}
            s = {"reference": scores(ref, ref_ev, params), "device": scores(dev, dev_ev, params)}
            if s["reference"] is not None:
                out.scores[v] = s
    return out


def say(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[{DEVICE}] {line}", end="")


@pytest.mark.parametrize("case", CASES)
def test_extract_on_device_matches_cpu(case, capsys):
    got, want = outcome(case).base["device"], outcome(case).base["cpu"]
    precision = case.rsplit("-", 1)[1]
    assert got.tensors.keys() == want.tensors.keys()
    assert got.meta == want.meta
    worst = 0.0
    for k, t in got.tensors.items():
        w = want.tensors[k]
        assert t.device.type == "cpu", f"{k}: evidence must be CPU tensors, got {t.device}"
        assert t.dtype == w.dtype and t.shape == w.shape, k
        if t.is_floating_point():
            err = relative_error(t, w)
            worst = max(worst, err)
            assert err <= EVIDENCE_BOUND[precision], f"{k}: {err:.2e} of its largest value"
        else:
            assert torch.equal(t, w), k
    say(capsys, f"{case}: evidence within {worst:.1e} of the CPU's")


@pytest.mark.parametrize("case", CASES)
def test_labels_agree_with_cpu_float32(case, capsys):
    o, precision = outcome(case), case.rsplit("-", 1)[1]
    assert o.labels, f"every variant skipped: {o.skipped}"
    worst = {"device on device": 1.0, "device on cpu": 1.0}
    for v, maps in o.labels.items():
        for which in worst:
            a = agreement(maps[which], maps["reference"])
            worst[which] = min(worst[which], a)
            assert a >= LABEL_AGREEMENT[precision], f"{v}, decoded {which}: {a:.4f} agree"
    # the comparison can tell devices apart: some variant labels more than one class
    assert any(len(np.unique(m["reference"])) > 1 for m in o.labels.values())
    skipped = f"; skipped {sorted(o.skipped)} ({next(iter(o.skipped.values()))})" \
        if o.skipped else ""
    say(capsys, f"{case}: {len(o.labels)} variants, worst pixel agreement with CPU float32: "
        + ", ".join(f"decoded {k} {100 * a:.2f}%" for k, a in worst.items()) + skipped)


@pytest.mark.parametrize("case", CASES)
def test_scores_within_bound(case, capsys):
    o, precision = outcome(case), case.rsplit("-", 1)[1]
    if not o.scores:
        pytest.skip(f"{case}: the method has none of {', '.join(SCORE_METHODS)}")
    worst = max(relative_error(s["device"], s["reference"]) for s in o.scores.values())
    say(capsys, f"{case}: decode scores within {worst:.1e} of CPU float32's")
    assert worst <= SCORE_BOUND[precision]


@pytest.mark.parametrize("case", CASES)
def test_evidence_decodes_on_the_other_device(case):
    for v, maps in outcome(case).labels.items():
        a = agreement(maps["device on cpu"], maps["device on device"])
        b = agreement(maps["cpu on device"], maps["cpu on cpu"])
        assert min(a, b) >= CROSS_AGREEMENT, f"{v}: {a:.4f} (device's evidence), {b:.4f} (CPU's)"


def _tuned_config(method: str) -> dict:
    """An exported config of the method's smoke preset (its tiny backbone)."""
    from methods.spec import load_method_spec
    from search.core.config import resolve

    spec = load_method_spec(method)
    smoke = spec.presets["smoke"]
    r = resolve(spec, backbone=smoke.backbone, dataset="voc21", preset=smoke)
    return {"method": method, "backbone_name": r.backbone_name, "backbone": r.backbone,
            "settings": r.settings, "params": r.defaults,
            "classes": {"names": ["background", "cat", "dog", "person"], "background": True}}


@pytest.mark.parametrize("method", METHODS)
def test_infer_on_device(method, tmp_path, capsys):
    import yaml
    from PIL import Image

    from methods.infer import main as infer_main

    cfg = tmp_path / "tuned.yaml"
    cfg.write_text(yaml.safe_dump(_tuned_config(method)))
    Image.fromarray(image(seed=5)).save(tmp_path / "img.png")
    maps = {}
    for device in dict.fromkeys([DEVICE, "cpu"]):
        out = tmp_path / f"{device.replace(':', '_')}.png"
        argv = ["--config", str(cfg), "--image", str(tmp_path / "img.png"), "--classes",
                "cat,dog,person", "--present", "cat,dog", "--out", str(out), "--device", device]
        assert infer_main(argv) == 0, capsys.readouterr().err[-2000:]
        maps[device] = np.array(Image.open(out))
    a = agreement(maps[DEVICE], maps["cpu"])
    labels = np.unique(maps["cpu"]).tolist()
    say(capsys, f"methods.infer {method} --device {DEVICE}: {100 * a:.2f}% of the pixels as "
        f"--device cpu (labels {labels})")
    assert a >= LABEL_AGREEMENT["float16"]
    assert len(labels) > 1            # a map the devices could disagree on


@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_of_one_extraction(method, capsys):
    """Real-size architecture on CUDA (bench/real_size.py; random weights); on the CPU the
    tiny backbone (the CPU run only keeps this code alive: real sizes take minutes there)."""
    from bench.real_size import build

    size = "real" if DEVICE.startswith("cuda") else "tiny"
    t0 = time.perf_counter()
    try:
        built = build(method, DEVICE, size)
    except LookupError as e:          # a new method: its real-size builder is still to write
        pytest.skip(str(e))
    t_build = time.perf_counter() - t0
    img = built.image()
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    ev = built.segmenter.extract(img, built.classes, built.present)
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        mem = (f"peak GPU memory {peak / 2**20:.0f} MiB ({resident / 2**20:.0f} MiB resident "
               f"before, +{(peak - resident) / 2**20:.0f} MiB for the extraction)")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mem = f"process peak RSS {rss:.0f} MiB (CPU run: no GPU memory to measure)"
    dt = time.perf_counter() - t0
    say(capsys, f"one {method} extraction, {built.describe} on {DEVICE}: {mem}; {dt:.2f} s "
        f"(built in {t_build:.0f} s); evidence {ev.nbytes() / 1e6:.1f} MB")
    assert ev.tensors
