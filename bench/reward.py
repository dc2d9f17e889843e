"""Cost of one trial's score: the CLIP contrastive reward vs mIoU, and the reward's batching gain.

    python bench/reward.py [--images 8] [--size 448] [--classes 3] [--repeats 3] [--device cpu]

Real-size open_clip ViT-B/16 architecture with random weights (the cost does not depend on the
weights; no download needed). Synthetic 448x448 scenes with 3 labelled classes each, VOC's 20
class names. Per trial the reward runs CLIP on every (image, class) masked image; the text
embeddings and the black image are per-search costs, paid once before timing and printed apart.
mIoU is rewards.miou.MiouAccumulator (a bincount confusion matrix). Prints ratios at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

VOC20 = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
         "train", "tvmonitor"]


def scenes(n: int, size: int, k: int, seed: int = 0):
    """n (image HxWx3 uint8, prediction HxW int64, label HxW int64, present) with k classes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        label = np.zeros((size, size), np.int64)
        present = sorted(rng.choice(np.arange(1, 21), k, replace=False).tolist())
        for c in present:
            y, x = rng.integers(0, size * 3 // 4, 2)
            h, w = rng.integers(size // 8, size // 3, 2)
            label[y:y + h, x:x + w] = c
            image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        pred = label.copy()
        pred[rng.random((size, size)) < 0.1] = 0            # an imperfect prediction
        out.append((image, pred, label, [c for c in present if (label == c).any()]))
    return out


def trial_seconds(new_acc, data, with_label: bool) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, value) of scoring every image of ``data`` with a
    fresh accumulator. CPU seconds are less sensitive to other jobs on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    acc = new_acc()
    for image, pred, label, present in data:
        acc.update(image, pred, label=label if with_label else None, present=present)
    value = acc.value()
    return time.perf_counter() - t0, time.process_time() - c0, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import open_clip

    from methods.base import ClassSet
    from rewards.clip_contrastive import ClipContrastiveReward
    from rewards.miou import MiouAccumulator

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).to(args.device).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    classes = ClassSet.from_names(VOC20, background=True)
    data = scenes(args.images, args.size, args.classes)
    pairs = sum(len(d[3]) for d in data)
    settings = {"batch_size": args.images}
    batched = ClipContrastiveReward(model, tokenizer, classes, settings, args.device)
    single = ClipContrastiveReward(model, tokenizer, classes, {"batch_size": 1}, args.device)

    t0 = time.perf_counter()
    batched.text_features()
    batched.black_features()
    per_search = time.perf_counter() - t0
    single.text_features()
    single.black_features()                                        # its per-search work, untimed
    trial_seconds(batched.new, data[:1], False)                    # warm-up
    threads = torch.get_num_threads()
    # batched and one-at-a-time runs alternate, so both see the same load of a shared machine
    runs: dict[str, list[tuple[float, float, float]]] = {"batched": [], "single": [], "miou": []}
    for _ in range(args.repeats):
        runs["batched"].append(trial_seconds(batched.new, data, False))
        runs["single"].append(trial_seconds(single.new, data, False))
        for _ in range(5):
            runs["miou"].append(trial_seconds(lambda: MiouAccumulator(len(classes.names)), data,
                                              True))
    (t_batched, c_batched, v_batched), (t_single, c_single, v_single), (t_miou, c_miou, v_miou) = (
        (statistics.median(r[0] for r in runs[k]), statistics.median(r[1] for r in runs[k]),
         runs[k][-1][2]) for k in ("batched", "single", "miou"))
    print(f"setup: {args.model} random weights, {args.device}, {threads} torch threads, "
          f"{args.images} images {args.size}x{args.size}, {pairs} (image, class) pairs, "
          f"median of {args.repeats} alternating runs, load average {os.getloadavg()[0]:.1f}")
    print(f"per search (once): text embeddings of {len(classes.foreground)} classes + black "
          f"image: {per_search * 1e3:.0f} ms")
    print(f"reward per trial, batched ({args.images} images/CLIP call): {t_batched * 1e3:.0f} ms "
          f"wall, {c_batched * 1e3:.0f} ms CPU (value {v_batched:.4f})")
    print(f"reward per trial, one image at a time: {t_single * 1e3:.0f} ms wall, "
          f"{c_single * 1e3:.0f} ms CPU (value {v_single:.4f}, same: {v_single == v_batched})")
    print(f"mIoU per trial (bincount confusion matrix): {t_miou * 1e3:.1f} ms wall, "
          f"{c_miou * 1e3:.1f} ms CPU (value {v_miou:.4f})")
    print(f"ratio reward/mIoU per trial: {t_batched / t_miou:.0f}x wall, {c_batched / c_miou:.0f}x "
          f"CPU; batching speedup (one at a time / batched): {t_single / t_batched:.2f}x wall, "
          f"{c_single / c_batched:.2f}x CPU")


if __name__ == "__main__":
    main()
