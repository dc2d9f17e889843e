"""The CLIP family on the toy CLIP: default held-out mIoU per variant, on generated data sets
that no training or tuning ever saw (their own generator seed, :data:`HELD_OUT_SEED`).

    python -m bench.toy_clip                        # the shipped weights, both data sets
    python -m bench.toy_clip --weights /tmp/w.safetensors --n 40 --variants maskclip,sclip

Prints one row per attention variant: mIoU (%) and foreground pixel accuracy per data set, each
with the paper-default knobs of the family (conf/methods/clipseg.yaml defaults, the toy-clip
backbone's layer defaults) and the smoke geometry (:data:`SETTINGS`). The tests read
:func:`heldout_scores` (tests/test_toy_clip.py); docs/toy-clip.md has the tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.clipseg import SEGMENTER
from methods.clipseg.variants import DEFAULT_VARIANTS
from methods.spec import load_method_spec
from rewards.miou import MiouAccumulator
from search.core.config import resolve
from search.data import open_dataset
from search.data.synthetic import make_dataset

#: The generator seed of every held-out set (training uses RECIPE["seed"], smoke searches 0).
HELD_OUT_SEED = 20_261_207
#: data set -> the generator's layout of it.
LAYOUTS = {"voc21": "voc", "context60": "context"}
#: The geometry of the toy world (64 px model input): what --preset smoke sets.
SETTINGS = {"short_side": 64, "window": 64, "stride": 32, "evidence_dtype": "float32"}
VARIANTS = ("maskclip", "sclip", "clearclip", "naclip", "cra", "scclip", "qk")


def heldout_root(dataset: str, n: int, base: Path) -> Path:
    """The held-out set of ``dataset`` (n images of about 96 x 128) under ``base``."""
    return make_dataset(LAYOUTS[dataset], base / f"{dataset}-heldout-{n}", n=n,
                        seed=HELD_OUT_SEED)


def segmenter(dataset: str, weights: str | None = None,
              settings: Mapping[str, Any] | None = None):
    """(clipseg segmenter of the toy CLIP, its resolved default knobs) for ``dataset``."""
    spec = load_method_spec("clipseg")
    overrides = {f"settings.{k}": v for k, v in {**SETTINGS, **(settings or {})}.items()}
    if weights:
        overrides["backbone.path"] = str(weights)
    r = resolve(spec, backbone="toy-clip", dataset=dataset, overrides=overrides)
    return SEGMENTER.from_spec(r.backbone, r.settings), dict(r.defaults)


def heldout_scores(dataset: str, params_list: Sequence[Mapping[str, Any]], n: int = 40,
                   weights: str | None = None, base: Path | None = None,
                   settings: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """mIoU and foreground pixel accuracy of each knob set (over the defaults) on the held-out
    set of ``dataset``; the evidence of each image is extracted once for all knob sets."""
    wanted = {str(p["attention"]) for p in params_list if "attention" in p}
    if wanted - set(DEFAULT_VARIANTS):          # scclip: extracted only when asked for
        settings = {"variants": [*DEFAULT_VARIANTS, *sorted(wanted - set(DEFAULT_VARIANTS))],
                    **(settings or {})}
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(dataset, heldout_root(dataset, n, Path(base or tmp)))
        seg, defaults = segmenter(dataset, weights, settings)
        accs = [MiouAccumulator(len(ds.classes.names)) for _ in params_list]
        fg = [[0, 0] for _ in params_list]
        for i in range(len(ds)):
            image, label = ds.image(i), ds.label(i)
            ev = seg.extract(image, ds.classes)
            for k, p in enumerate(params_list):
                pred = np.asarray(seg.decode(ev, {**defaults, **p}))
                accs[k].update(image, pred, label)
                mask = (label != ds.ignore_index) & (label != 0)
                fg[k][0] += int((pred[mask] == label[mask]).sum())
                fg[k][1] += int(mask.sum())
        return [{"miou": a.value(), "fg_acc": f[0] / max(1, f[1])} for a, f in zip(accs, fg)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_clip", description=__doc__.split(
        "\n")[0])
    p.add_argument("--weights", help="a toy-clip safetensors file (default: the shipped one)")
    p.add_argument("--n", type=int, default=40, help="held-out images per data set")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--datasets", default=",".join(LAYOUTS))
    p.add_argument("--bg-threshold", type=float, help="fix bg_threshold (default: the paper's)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    variants = a.variants.split(",")
    extra = {} if a.bg_threshold is None else {"bg_threshold": a.bg_threshold}
    t0 = time.perf_counter()
    table = {}
    for ds in a.datasets.split(","):
        rows = heldout_scores(ds, [{"attention": v, **extra} for v in variants], a.n, a.weights)
        table[ds] = rows
    print(f"toy CLIP ({a.weights or 'shipped'}), {a.n} held-out images per data set "
          f"(seed {HELD_OUT_SEED}), default knobs; mIoU % (foreground pixel accuracy %)")
    print("| variant | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for k, v in enumerate(variants):
        print(f"| {v} | " + " | ".join(f"{100 * table[d][k]['miou']:.1f} "
                                       f"({100 * table[d][k]['fg_acc']:.0f})" for d in table)
              + " |")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
