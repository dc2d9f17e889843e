"""Extract once, decode many vs the naive search for `scclip` and PAMR, on the real ViT-B/16.

    python bench/scclip_pamr.py                       # 2 images, 8 trials a preset (~10 min)
    python bench/scclip_pamr.py --images 1 --trials 4 --naive-trials 1       # a quick look

Two searches, each as ``search.run --preset <name>`` plans it (the preset's protocol, space and
trial-0 defaults; ``settings.variants`` / ``scclip_layers`` filled from the space by
methods/clipseg/reach.py, as before Ray):

- ``scclip``: SC-CLIP's protocol (short side 336, windows 224 / 112), attention scclip, its
  index knobs, res_cls, adjust_beta and PAMR sampled;
- ``naclip``: NACLIP's protocol (VOC21: the whole image), trial 0 NACLIP's main results
  (naclip + PAMR 10 x (8, 16)), every default variant and PAMR sampled.

The model is open_clip 'ViT-B-16' (the real-size architecture, random weights: no download),
images 375 x 500 (Pascal VOC's usual size), VOC21 with its reference name lists (56 names with
the 26 background words). Trial 0 is the preset's defaults, the other trials are sampled from
its space with a seeded RNG (``--pamr`` forces PAMR on or off in every trial).

- ours:  extract each image once, then decode every trial (evidence in float16);
- naive: a full forward per trial and image (methods/clipseg/reference.py, PAMR included), timed
  on the first ``--naive-trials`` trials of every image, interleaved with ours image by image,
  and scaled to all trials. Its cost depends on the knobs only through PAMR, so the scaling is
  done separately for trials with and without PAMR (mean of the timed ones of each kind; a kind
  never timed is timed once more).

Printed per preset: evidence MB per image, decode ms per variant with and without PAMR, the
ratio naive / ours, and beside it its two limits: ``decode-bound`` (trials -> infinity: naive
per trial / decode per trial) and ``extract-bound`` (decode free: trials x naive per trial /
extract). Single-threaded by default (``--threads``), as a search runs one trial per CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ExtractOnce, smooth_image
from methods.base import ClassSet
from methods.clipseg.reference import full_forward_labels
from methods.clipseg.segmenter import ClipSegSegmenter
from methods.spec import load_method_spec
from search.core.config import resolve
from search.core.space import sample_value


def plan(preset: str, trials: int, seed: int, pamr: str):
    """(settings, trial params) of ``search.run --preset <preset>`` on ViT-B/16, VOC21."""
    spec = load_method_spec("clipseg")
    r = resolve(spec, backbone="openai-vit-b16", dataset="voc21", preset=spec.presets[preset])
    space = {k: p.model_dump(exclude_none=True) for k, p in r.space.items()}
    settings = ClipSegSegmenter.search_settings(r.backbone, r.settings, r.defaults, space)
    rng = np.random.default_rng(seed)
    out = [dict(r.defaults)]
    while len(out) < trials:
        out.append({**r.defaults, **{k: sample_value(p, rng) for k, p in r.space.items()}})
    for p in out:
        if pamr == "on" and int(p["pamr_steps"]) == 0:
            p["pamr_steps"] = 10
        if pamr == "off":
            p["pamr_steps"] = 0
    return settings, out[:trials]


def bench(preset: str, model: torch.nn.Module, images: list[np.ndarray], args) -> None:
    from search.data.spec import load_spec

    settings, trials = plan(preset, args.trials, args.seed, args.pamr)
    settings = {**settings, "templates": "simple"}
    if args.short_side:
        settings["short_side"] = args.short_side
    seg = ClipSegSegmenter(model, "ViT-B-16", {"name": "vit-b16-random"}, settings)
    spec = load_spec("voc21")
    classes = ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)
    t0 = time.perf_counter()
    names = seg.class_names(classes)[0]
    seg.text_embeddings(names)
    t_text = time.perf_counter() - t0
    print(f"\n== preset {preset}: protocol {seg.settings['protocol']}, short side "
          f"{seg.settings['short_side']}, window {seg.settings['window']} / stride "
          f"{seg.settings['stride']}, variants {list(seg.variants)}, scclip_layers "
          f"{seg.scclip_layers}; {len(names)} names (text once, {t_text:.1f} s, in neither)")
    k = max(1, min(args.naive_trials, len(trials)))
    ours_ = ExtractOnce(seg, classes,
                        lambda p: p["attention"] + ("+pamr" if int(p["pamr_steps"]) else ""))
    naive: dict[bool, list[float]] = {False: [], True: []}
    agree = []
    for img in images:
        mine = ours_.run(img, trials)
        timed = list(range(k))
        for kind in (False, True):          # time each kind (PAMR off / on) at least once
            if not naive[kind] and not any(bool(int(trials[i]["pamr_steps"])) == kind
                                           for i in timed):
                timed += [i for i, p in enumerate(trials)
                          if bool(int(p["pamr_steps"])) == kind][:1]
        for i in timed:
            t0 = time.perf_counter()
            lab = full_forward_labels(seg, img, classes, trials[i])
            naive[bool(int(trials[i]["pamr_steps"]))].append(time.perf_counter() - t0)
            agree.append(float((lab == mine[i]).mean()))
    n_img, n_tr = len(images), len(trials)
    t_extract, t_decode, evidence_mb = ours_.t_extract, ours_.t_decode, ours_.evidence_mb
    ours = t_extract + t_decode
    on = sum(bool(int(p["pamr_steps"])) for p in trials)
    mean = {kind: float(np.mean(ts)) if ts else float("nan") for kind, ts in naive.items()}
    naive_total = n_img * ((on * mean[True] if on else 0.0)
                           + ((n_tr - on) * mean[False] if on < n_tr else 0.0))
    per_naive = naive_total / (n_img * n_tr)
    per_decode = t_decode / (n_img * n_tr)
    print(f"ours:  extract {t_extract:.1f} s ({t_extract / n_img:.2f} s/image) + "
          f"{n_img * n_tr} decodes {t_decode:.1f} s ({1000 * per_decode:.0f} ms each) "
          f"= {ours:.1f} s")
    print(ours_.variant_line())
    print(f"naive: {len(naive[False])} full forwards without PAMR ({mean[False]:.2f} s each), "
          f"{len(naive[True])} with ({mean[True]:.2f} s each), scaled to {n_img} x {n_tr} "
          f"({on} of {n_tr} trials with PAMR) = {naive_total:.1f} s; label agreement with "
          f"ours (float16 evidence) {100 * np.mean(agree):.2f}% ({len(agree)} maps)")
    mb = float(np.mean(evidence_mb))
    print(f"evidence: {mb:.1f} MB per image (float16; max {max(evidence_mb):.1f})")
    print(f"{preset}: ratio={naive_total / ours:.1f} (limits: decode-bound "
          f"{per_naive / per_decode:.1f}, extract-bound "
          f"{n_tr * per_naive / (t_extract / n_img):.1f}) evidence_mb={mb:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="scclip,naclip")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--naive-trials", type=int, default=2,
                    help="trials per image timed for the naive search (scaled to --trials)")
    ap.add_argument("--pamr", choices=("space", "on", "off"), default="space",
                    help="PAMR as the space samples it, or forced on (10 steps) / off")
    ap.add_argument("--short-side", type=int, default=0, help="0: the protocol's")
    ap.add_argument("--size", default="375x500", help="image HxW before resizing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both ways (1: as one Ray trial per CPU; 0: default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    torch.manual_seed(args.seed)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    rng = np.random.default_rng(args.seed)
    images = [smooth_image(rng, h, w) for _ in range(args.images)]
    print(f"scclip / PAMR bench: open_clip ViT-B-16 (random weights), {args.images} images "
          f"{h}x{w}, {args.trials} trials a preset, {torch.get_num_threads()} threads")
    for preset in args.presets.split(","):
        bench(preset.strip(), model, images, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
