"""Extract once, decode many vs the naive search, for `clipseg` on the real ViT-B/16.

    python bench/clipseg.py                    # 8 images, 64 trials (3-4 min, 1 thread)
    python bench/clipseg.py --images 2 --trials 8 --naive-trials 1     # quick look
    python bench/clipseg.py --device cuda      # the model on the GPU (bench/device_check.sh)

Trials sample every ``attention`` variant of the YAML (the CRA rows and the family's blocks);
the output gives decode ms per variant. PAMR (``pamr_steps``) is off in every trial unless
``--pamr space``: its cost is in bench/scclip_pamr.py, this bench's figures stay comparable with
those before it existed.

The model is open_clip 'ViT-B-16' (the real-size architecture, random weights: no download).
Images are 375 x 500 (Pascal VOC's usual size), resized to short side 448: with the default
``--protocol custom`` 15 windows of 224 px with stride 112 (the largest evidence of the family's
geometries at 448; ``--protocol cra`` is 2 windows of 448 px). Classes: the 20 VOC names +
background. Trial 0 is the paper's defaults, the
other trials are sampled from conf/methods/clipseg.yaml's space with a seeded RNG.

- ours:  extract each image once, then decode every trial (evidence in float16).
- naive: a full forward per trial and image (methods/clipseg/reference.py), as the paper's code
  runs a configuration. It is timed on the first ``--naive-trials`` trials of every image and
  scaled to all trials (the forward's cost does not depend on the knobs); the output says so.
Text embeddings depend only on (backbone, classes): both ways compute them once, outside the
timings (with the 7 `simple` templates here, to keep the bench short; the 80 templates cost the
same in both).
Both ways run with ``--threads`` torch threads (1 by default: a search runs one trial per CPU,
and one thread is less disturbed by other work on a shared 2-core machine); they are timed image
by image, ours then the naive subset, so that a change of machine load hits both alike.
The last line is ``ratio=<naive/ours> evidence_mb=<MB per image>`` (MB = 10^6 bytes).
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

from bench.common import (  # noqa: E402
    ExtractOnce,
    add_device_args,
    device_line,
    smooth_image,
    start_device,
    tiny_segmenter,
)
from methods.base import ClassSet
from methods.clipseg.reference import full_forward_labels
from methods.clipseg.segmenter import ClipSegSegmenter
from methods.spec import load_method_spec
from search.core.config import resolve
from search.core.space import sample_value

VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
       "train", "tvmonitor")


def trials(n: int, seed: int, layers: int = 12, pamr: str = "off") -> list[dict]:
    """Trial 0: the paper's defaults; then YAML samples (``layer`` kept below ``layers``: the
    tiny ViT of ``--tiny`` has fewer blocks than ViT-B/16's 12); PAMR off unless ``pamr`` is
    ``space``."""
    resolved = resolve(load_method_spec("clipseg"), backbone="openai-vit-b16", dataset="voc21")
    rng = np.random.default_rng(seed)
    out = [dict(resolved.defaults)]
    while len(out) < n:
        out.append({**resolved.defaults,
                    **{k: sample_value(p, rng) for k, p in resolved.space.items()}})
    if pamr == "off":
        out = [{**p, "pamr_steps": 0} for p in out]
    return [{**p, "layer": min(int(p["layer"]), layers - 1)} for p in out[:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--naive-trials", type=int, default=2,
                    help="trials per image timed for the naive search (scaled to --trials)")
    ap.add_argument("--short-side", type=int, default=448)
    ap.add_argument("--protocol", default="custom",
                    help="settings profile (custom: windows 224 / stride 112, the largest "
                         "evidence at short side 448; cra: 448 / 224)")
    ap.add_argument("--size", default="375x500", help="image HxW before resizing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pamr", choices=("off", "space"), default="off",
                    help="PAMR off in every trial, or as the space samples it")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both ways (1: as one Ray trial per CPU; 0: default)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = start_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))

    torch.manual_seed(args.seed)
    settings = {"protocol": args.protocol, "short_side": args.short_side, "templates": "simple"}
    if args.tiny:
        h, w = 60, 80
        seg = tiny_segmenter("clipseg", device, {**settings, "short_side": 64, "window": 32,
                                                 "stride": 16})
        model_name = "the tiny open_clip ViT of conf/methods/clipseg.yaml"
    else:
        model = open_clip.create_model("ViT-B-16", pretrained=None, device=device).eval()
        seg = ClipSegSegmenter(model, "ViT-B-16", {"name": "vit-b16-random"}, settings, device)
        model_name = "open_clip ViT-B-16"
    classes = ClassSet.from_names(VOC, background=True)
    t0 = time.perf_counter()
    seg.text_embeddings(seg.class_names(classes)[0])
    t_text = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    images = [smooth_image(rng, h, w) for _ in range(args.images)]
    plan = trials(args.trials, args.seed, seg.num_layers, args.pamr)
    print(f"clipseg bench: {model_name} (random weights) on {device}, {args.images} images "
          f"{h}x{w} -> short side {seg.settings['short_side']}, {args.trials} trials, "
          f"{torch.get_num_threads()} threads; text embeddings once ({t_text:.1f} s, not "
          "counted in either)")

    # Image by image, ours then the naive subset, so that a change of machine load hits both.
    k = max(1, min(args.naive_trials, len(plan)))
    ours_ = ExtractOnce(seg, classes, lambda p: p["attention"])
    t_naive, agree = 0.0, []
    for img in images:
        ours_labels = ours_.run(img, plan)
        for p, mine in zip(plan[:k], ours_labels):
            t0 = time.perf_counter()
            lab = full_forward_labels(seg, img, classes, p)
            t_naive += time.perf_counter() - t0
            agree.append(float((lab == mine).mean()))
    t_extract, t_decode, evidence_mb = ours_.t_extract, ours_.t_decode, ours_.evidence_mb
    ours = t_extract + t_decode
    n_dec = args.images * len(plan)
    print(f"ours:  extract {t_extract:.1f} s ({t_extract / args.images:.2f} s/image) + "
          f"{n_dec} decodes {t_decode:.1f} s ({1000 * t_decode / n_dec:.0f} ms each) "
          f"= {ours:.1f} s")
    print(ours_.variant_line())
    per = t_naive / (args.images * k)
    naive = per * args.images * len(plan)
    print(f"naive: timed {args.images * k} full forwards (first {k} trials of each image), "
          f"{per:.2f} s each, scaled to {args.images} x {len(plan)} = {naive:.1f} s; "
          f"label agreement with ours (float16 evidence) {100 * np.mean(agree):.2f}%")
    mb = float(np.mean(evidence_mb))
    print(f"evidence: {mb:.1f} MB per image (float16; max {max(evidence_mb):.1f})")
    print(device_line(device, args.images, t_extract, len(plan), t_decode))
    print(f"ratio={naive / ours:.1f} evidence_mb={mb:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
