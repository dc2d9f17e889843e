"""Extract once, decode many vs the naive search, for `pnp` on the real-size BLIP-base ITM.

``python bench/pnp.py`` runs the two-stage search bench (bench/pnp_two_stage.py: 64 proxy trials
at D = 1 without CRF, the top 4 re-ranked at D = 4 with CRF, against the naive search and the
reference's own search procedure). ``--one-stage`` runs this file's first bench:

    python bench/pnp.py --one-stage                       # 4 images, 5 classes, 64 trials
    python bench/pnp.py --one-stage --images 1 --trials 8 --image-size 224    # quick look
    python bench/pnp.py --one-stage --device cuda         # the model on the GPU

Model: ``BlipForImageTextRetrieval(BlipConfig())`` with the text encoder's 12 heads of the
released blip-itm-base checkpoints (BlipConfig's default is 8 heads, the architecture is
otherwise the defaults; random weights: no download) and the offline word-piece tokenizer.
Images: 375 x 500 (Pascal VOC's usual size), square-resized to --image-size (224: the paper's
smaller setting; 336 is the reference code's). Prompt: "a picture of" + 5 classes. Trials: trial 0
is the paper's solution (L8 H10 T0.15 sigma 0.05), the others are drawn from the paper's space
(conf/methods/pnp.yaml, backbone blip-base-flickr) with a seeded RNG; D = 4 drop iterations (the
reference's inference setting, top-10 patches per iteration), CRF off by default (the reference's
search scores maps without CRF; --crf turns it on, it costs the same in both ways).

- ours:  extract every image once (one forward + backward for all 12 x 12 layer/heads), then per
  trial: the drop chain of (layer, head, D) from the evidence cache (search/core/cache.py, on
  disk) or, on a miss, ``extend`` (D - 1 passes, backward only down to that layer), then
  ``decode``.
- naive: per trial the whole pipeline (methods/pnp/reference.py: D passes, each the reference
  code's GradCAM pass with a full backward to the image), as the paper's code runs one
  configuration (which also computes every weight gradient: this is a lower bound of its cost).
  Timed on the first --naive-trials trials of every image and scaled to all trials
  (its cost does not depend on the knobs); the output says so. A second naive figure, what the
  caching alone buys, is our own pipeline without any cache (extract + one chain + decode per
  trial), estimated from ours' measured extract, per-chain and per-decode times.
The last line is ``ratio=<naive/ours> evidence_mb=<MB per image>`` (MB = 10^6 bytes of cache
files: base evidence plus every cached drop chain of the image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_device_args, device_line, smooth_image, start_device, tiny_segmenter
from bench.pnp_common import CLASSES, trials
from methods.base import ClassSet
from methods.pnp.backbone import random_model, tiny_tokenizer
from methods.pnp.reference import naive_segment
from methods.pnp.segmenter import PnPSegmenter
from search.core.cache import EvidenceCache, evidence_key


def one_stage(argv: list[str] | None = None) -> int:
    """The first benchmark: every trial at D, no re-ranking (``--one-stage``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one-stage", action="store_true")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--naive-trials", type=int, default=1,
                    help="trials per image timed for the naive search (scaled to --trials)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--drop-iters", type=int, default=4)
    ap.add_argument("--crf", action="store_true", help="dense CRF in decode (both ways)")
    ap.add_argument("--size", default="375x500", help="image HxW before resizing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = start_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))

    from transformers import BlipConfig

    t0 = time.perf_counter()
    if args.tiny:
        h, w = 60, 80
        seg = tiny_segmenter("pnp", device, {"drop_k": 3})
        vlm, model_name = seg.vlm, "the tiny BLIP ITM of conf/methods/pnp.yaml"
    else:
        vlm = random_model("blip", BlipConfig(text_config={"num_attention_heads": 12}),
                           tiny_tokenizer("blip"), args.seed, device)
        seg = PnPSegmenter(vlm, {"name": "blip-base-random"}, {"image_size": args.image_size},
                           device)
        model_name = "BLIP-base ITM"
    t_build = time.perf_counter() - t0
    classes = ClassSet.from_names(CLASSES, background=True)
    present = list(classes.foreground)
    rng = np.random.default_rng(args.seed)
    images = [smooth_image(rng, h, w) for _ in range(args.images)]
    plan = trials(args.trials, args.seed, args.drop_iters, args.crf, vlm.layers, vlm.heads)
    chains = {(p["layer"], p["head"], p["drop_iters"]) for p in plan}
    print(f"pnp bench: {model_name} (random weights, {vlm.layers} text layers x {vlm.heads} "
          f"heads) on {device}, {args.images} images {h}x{w} -> "
          f"{seg.settings['image_size']}px "
          f"({seg.grid}x{seg.grid} patches), {len(CLASSES)} classes, {len(plan)} trials with "
          f"D={args.drop_iters}, crf={'on' if args.crf else 'off'}, {torch.get_num_threads()} "
          f"threads; model built in {t_build:.1f} s (not counted)")

    k = max(1, min(args.naive_trials, len(plan)))
    t_extract = t_extend = t_decode = t_naive = 0.0
    hits = misses = 0
    agree = []
    skey = seg.settings_key()
    with tempfile.TemporaryDirectory(prefix="pnp-bench-") as tmp:
        cache = EvidenceCache(tmp, memory_mb=0)       # every read comes from the disk files
        for i, img in enumerate(images):
            t0 = time.perf_counter()
            ev = seg.extract(img, classes, present)
            cache.put("pnp", evidence_key(f"img{i}", "pnp", skey, {"present": present}), ev)
            t_extract += time.perf_counter() - t0
            ours = []
            for p in plan:
                knobs = seg.extraction_subset(p)
                key = evidence_key(f"img{i}", "pnp", skey, {"present": present, **knobs})
                t0 = time.perf_counter()
                extra = cache.get("pnp", key)
                if extra is None:
                    misses += 1
                    extra = seg.extend(ev, img, classes, present, knobs)
                    cache.put("pnp", key, extra)
                else:
                    hits += 1
                t1 = time.perf_counter()
                ours.append(seg.decode(ev.merged(extra), p))
                t_extend += t1 - t0
                t_decode += time.perf_counter() - t1
            for p, mine in zip(plan[:k], ours):
                t0 = time.perf_counter()
                lab = naive_segment(seg, img, classes, p, present)
                t_naive += time.perf_counter() - t0
                agree.append(float((lab == mine).mean()))
        mb = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors")) / 1e6 / len(images)
    ours_total = t_extract + t_extend + t_decode
    n = args.images * len(plan)
    print(f"ours:  extract {t_extract:.1f} s ({t_extract / args.images:.2f} s/image) + drop "
          f"chains {t_extend:.1f} s ({misses} computed, {hits} of {n} trials = "
          f"{100 * hits / n:.0f}% reused a cached chain; {len(chains)} distinct (layer, head, D)) "
          f"+ {n} decodes {t_decode:.1f} s ({1000 * t_decode / n:.0f} ms each) "
          f"= {ours_total:.1f} s")
    per = t_naive / (args.images * k)
    naive = per * n
    per_same = t_extract / args.images + t_extend / max(misses, 1) + t_decode / n
    print(f"naive: timed {args.images * k} whole-pipeline runs (first {k} trial(s) of each "
          f"image), {per:.2f} s each, scaled to {args.images} x {len(plan)} = {naive:.1f} s; "
          f"label agreement with ours (float16 evidence) {100 * np.mean(agree):.2f}%")
    print(f"naive with our own passes, no cache (what the caching alone buys; estimated from "
          f"ours' timings): {per_same:.2f} s per run, {per_same * n:.1f} s, "
          f"ratio {per_same * n / ours_total:.2f}")
    print(f"evidence: {mb:.2f} MB per image on disk (base + {len(chains)} chains; "
          f"base {ev.nbytes() / 1e6:.2f} MB, one chain {extra.nbytes() / 1e6:.3f} MB)")
    print(device_line(device, args.images, t_extract, len(plan), t_extend + t_decode))
    print(f"ratio={naive / ours_total:.1f} evidence_mb={mb:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--one-stage" in args:
        return one_stage(argv)
    from bench.pnp_two_stage import two_stage

    return two_stage(argv)


if __name__ == "__main__":
    raise SystemExit(main())
