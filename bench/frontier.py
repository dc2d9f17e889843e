"""Extract once, decode many vs the naive search, for `proxyclip` and `trident` at real sizes.

    python bench/frontier.py --method proxyclip          # 2 images, 64 trials
    python bench/frontier.py --method trident            # the same with SAM ViT-B
    python bench/frontier.py --method trident --images 1 --trials 8     # quick look

Models: open_clip 'ViT-B-16' and the second models' real architectures with random weights (no
download): DINO ViT-B/8 for ProxyCLIP, DINO ViT-B/16 and SAM ViT-B (1024 px) for Trident, as
their official code uses them. Images: 375 x 500 (Pascal VOC's usual size) with some structure;
classes VOC21 under the method's protocol (`--preset proxyclip` / `trident`: short side 336 /
448, windows 336 / 112 and 336 / 224, the 26 stuff words as the background query). Trial 0 is
the protocol's values, the other trials are sampled from the preset's space with a seeded RNG;
Trident's alternate between refinement on and off (decode ms are printed for each).

- ours:  extract each image once (float16 evidence), then decode every trial;
- naive: the straight forward of every trial (methods/clipseg/reference_second.py: CLIP, the
  vision model and SAM's set_image per trial, as the official code runs a configuration),
  timed on the first ``--naive-trials`` trials of every image and scaled to all trials.

Image by image, ours then the naive subset, so a change of machine load hits both. Both run with
``--threads`` torch threads (1: one trial per CPU). The last line is
``ratio=<naive/ours> limit=<naive/decode per trial> evidence_mb=<MB per image>``; ``limit``
is the ratio with infinitely many trials (extraction paid once): the ratio approaches it as
trials grow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ExtractOnce, smooth_image, steady_malloc  # noqa: E402
from methods.base import ClassSet  # noqa: E402
from methods.clipseg.reference import full_forward_labels  # noqa: E402
from methods.clipseg.segmenter import ClipSegSegmenter  # noqa: E402
from methods.spec import load_method_spec  # noqa: E402
from search.core.config import resolve  # noqa: E402
from search.core.space import sample_value  # noqa: E402

MODELS = {"dino-vitb8": {"arch": "dino", "random": True, "patch": 8},
          "dino-vitb16": {"arch": "dino", "random": True, "patch": 16},
          "sam-vitb": {"arch": "sam", "size": "vit_b", "random": True, "patch": 16}}


def plan(method: str, n: int, seed: int) -> tuple[dict, list[dict]]:
    """The preset's settings and ``n`` trials (trial 0: the protocol's values)."""
    spec = load_method_spec("clipseg")
    r = resolve(spec, dataset="voc21", preset=spec.presets[method])
    rng = np.random.default_rng(seed)
    out = [dict(r.defaults)]
    while len(out) < n:
        out.append({**r.defaults, **{k: sample_value(p, rng) for k, p in r.space.items()}})
    if method == "trident":
        for i, p in enumerate(out):
            p["sam_refine"] = i % 2 == 0
    return r.settings, out[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("proxyclip", "trident"), default="proxyclip")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--naive-trials", type=int, default=1,
                    help="trials per image timed for the naive search (scaled to --trials)")
    ap.add_argument("--size", default="375x500", help="image HxW before resizing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    note = steady_malloc(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    import open_clip

    torch.manual_seed(args.seed)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    settings, trials = plan(args.method, args.trials, args.seed)
    # variants: what `--preset proxyclip` / `trident` extracts (a search fills it from the
    # preset's space, methods/clipseg/reach.py); null would add the family's evidence too
    settings = {**settings, "templates": "simple", "vision_models": MODELS,
                "variants": [args.method]}
    seg = ClipSegSegmenter(model, "ViT-B-16", {"name": "vit-b16-random"}, settings)
    from search.data.spec import load_spec

    spec = load_spec("voc21")
    classes = ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)
    t0 = time.perf_counter()
    seg.text_embeddings(seg.class_names(classes)[0])
    for n in seg.settings["vision"] + ([seg.settings["sam"]] if seg.settings["sam"] else []):
        seg.vision(n)
    t_setup = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    images = [smooth_image(rng, h, w) for _ in range(args.images)]
    print(f"{args.method} bench: open_clip ViT-B-16 + {', '.join(seg._vision)} (random "
          f"weights), {args.images} images {h}x{w}, protocol {seg.settings['protocol']} "
          f"(short side {seg.settings['short_side']}, windows {seg.settings['window']} / "
          f"{seg.settings['stride']}), {len(trials)} trials, {torch.get_num_threads()} "
          f"threads, {note}; text embeddings and model building once ({t_setup:.1f} s, in "
          f"neither)", flush=True)
    k = max(1, min(args.naive_trials, len(trials)))
    ours_ = ExtractOnce(seg, classes, lambda p: p["attention"] + (
        "+refine" if p.get("sam_refine") and p["attention"] == "trident" else ""))
    t_naive, agree = 0.0, []
    for img in images:
        mine = ours_.run(img, trials)
        for p, lab in zip(trials[:k], mine):
            t0 = time.perf_counter()
            want = full_forward_labels(seg, img, classes, p)
            t_naive += time.perf_counter() - t0
            agree.append(float((want == lab).mean()))
        print(f"  image done: extract {ours_.t_extract:.1f} s, decodes {ours_.t_decode:.1f} s, "
              f"naive {t_naive:.1f} s so far", flush=True)
    t_extract, t_decode = ours_.t_extract, ours_.t_decode
    evidence_mb, ev = ours_.evidence_mb, ours_.last
    ours = t_extract + t_decode
    n_dec = args.images * len(trials)
    print(f"ours:  extract {t_extract:.1f} s ({t_extract / args.images:.1f} s/image) + {n_dec} "
          f"decodes {t_decode:.1f} s ({1000 * t_decode / n_dec:.0f} ms each) = {ours:.1f} s")
    print(ours_.variant_line())
    per = t_naive / (args.images * k)
    naive = per * n_dec
    print(f"naive: timed {args.images * k} full forwards (first {k} trial(s) of each image), "
          f"{per:.1f} s each, scaled to {args.images} x {len(trials)} = {naive:.1f} s; label "
          f"agreement with ours (float16 evidence) {100 * np.mean(agree):.2f}%")
    mb = float(np.mean(evidence_mb))
    print(f"evidence: {mb:.1f} MB per image (float16; max {max(evidence_mb):.1f}; "
          + ", ".join(f"{k} {v.numel() * v.element_size() / 1e6:.1f}"
                      for k, v in sorted(ev.tensors.items())
                      if v.numel() * v.element_size() > 1e5) + ")")
    limit = per / (t_decode / n_dec)
    print(f"ratio={naive / ours:.1f} limit={limit:.1f} evidence_mb={mb:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
