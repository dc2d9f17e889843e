"""Does the toy BLIP's cross-attention localize? `pnp` on held-out generated scenes with the
weights of bench/toy_blip_train.py against the untrained weights of the same config.

    python -m bench.toy_blip_train --out /tmp/toy-blip --init-out /tmp/toy-blip-init
    python -m bench.toy_blip --trained /tmp/toy-blip --random /tmp/toy-blip-init

Both models load through the pnp backbone path (``{"arch": "blip", "path": DIR}``). Data: the
held-out VOC-like set of bench/toy_clip.py (``make_dataset("voc", ..., seed=HELD_OUT_SEED)``,
``open_dataset("voc21", ...)``). Settings: the smoke preset's (conf/methods/pnp.yaml: 64 px,
``drop_k`` 3, ``work_max_side`` 128, the tiny presence CLIP) and the voc21 prompt names.
Presence: ``model`` (the smoke preset's: ``present`` not passed, the random tiny CLIP picks the
classes) or ``gt`` (the label map's classes: localization alone). Maps: ``gradcam`` (the method)
or ``attn`` (the cross-attention alone, no gradient: the GradCAM ablation; pnp has no knob).

Knobs: ``paper`` (threshold 0.15, sigma 0.05, D 4, CRF on) and ``smoke`` (the same with D 2,
CRF off). Per layer the numbers are means over the heads, with the best head's mIoU. With gt
presence, on the first-pass maps (threshold-free; the label map sampled at the patch centres):
``point``, the pointing game (the share of present classes whose map peaks on a patch of that
class); ``inside``, the share of a class map's mass on the class's own patches (a uniform map
gets the class's area share); ``cos``, the cosine between two present classes' maps (1: one map
for all classes). ``held-out ITM accuracy``: does the model tell the true prompt from the prompt
with one class swapped for an absent painted class (recognition, not localization).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.toy_clip import HELD_OUT_SEED
from methods.pnp.formulas import gradcam_attention
from methods.pnp.segmenter import PnPSegmenter
from methods.pnp.text import Prompt
from rewards.miou import MiouAccumulator
from search.data import open_dataset
from search.data.synthetic import STYLES, make_dataset

SETTINGS: dict[str, Any] = {"image_size": 64, "drop_k": 3, "presence_model": "tiny",
                            "work_max_side": 128, "evidence_dtype": "float32",
                            "prompt_names": {"diningtable": "table"}}
KNOBS: dict[str, dict[str, Any]] = {
    "paper": {"threshold": 0.15, "sigma": 0.05, "drop_iters": 4, "crf": True},
    "smoke": {"threshold": 0.15, "sigma": 0.05, "drop_iters": 2, "crf": False},
}


class AttentionOnly(PnPSegmenter):
    """PnP with the GradCAM factor left out: the maps are the cross-attention itself."""

    def gradcam_pass(self, pixels: torch.Tensor, prompt: Prompt,
                     layers: Sequence[int]) -> torch.Tensor:
        ids = prompt.input_ids.to(self.vlm.device)
        mask = prompt.attention_mask.to(self.vlm.device)
        with torch.no_grad(), self.vlm.catch_attention(list(layers)) as caught:
            self.vlm.match_logit(pixels.to(self.vlm.device), ids, mask)
        return torch.stack([gradcam_attention(caught[li][0], torch.ones_like(caught[li][0]),
                                              mask[0]) for li in layers]).float().cpu()


def segmenter(path: Path, maps: str) -> PnPSegmenter:
    cls = AttentionOnly if maps == "attn" else PnPSegmenter
    return cls.from_spec({"name": "toy-blip", "arch": "blip", "path": str(path)}, SETTINGS)


def map_stats(seg: PnPSegmenter, ev: Any, label: np.ndarray, layer: int, head: int
              ) -> np.ndarray:
    """Sums over the present classes of (pointing hit, share of the map's mass on the class's
    own patches), over the pairs of classes of (cosine of the two maps, 1), and over the present
    classes of the class's area share (the chance level of both the first): first-pass maps of
    (layer, head), the label map resized (nearest) to the patch grid."""
    maps = seg.first_pass_maps(ev, layer, head).flatten(1)      # K x P²
    p = int(round(maps.shape[-1] ** 0.5))
    h, w = label.shape
    grid = label[((np.arange(p) + 0.5) * h / p).astype(int)][:, ((np.arange(p) + 0.5) * w / p)
                                                               .astype(int)].reshape(-1)
    out = np.zeros(5)
    for k, c in enumerate(ev.meta["present"]):
        out[0] += float(grid[int(maps[k].argmax())] == c)
        out[4] += float((grid == c).mean())
        total = float(maps[k].sum())
        out[1] += float(maps[k][torch.from_numpy(grid == c)].sum()) / total if total > 0 else 0.0
    if maps.shape[0] > 1:
        v = torch.nn.functional.normalize(maps, dim=-1)
        s = v @ v.T
        k = maps.shape[0]
        out[2] += float((s.sum() - s.trace()) / (k * (k - 1)))
        out[3] += 1
    return out


def itm_accuracy(path: Path, n: int, base: Path) -> float:
    """Held-out ITM check: the share of images whose true prompt outscores the same prompt with
    one class swapped for an absent painted class (global recognition, not localization)."""
    ds = open_dataset("voc21", make_dataset("voc", base / f"voc-heldout-{n}", n=n,
                                            seed=HELD_OUT_SEED))
    seg = segmenter(path, "gradcam")
    things = [ds.classes.names.index(t) for t in STYLES["voc"].things]
    rng = np.random.default_rng(0)
    wins, total = 0, 0
    for i in range(len(ds)):
        image, label = ds.image(i), ds.label(i)
        gt = sorted(set(np.unique(label).tolist()) - {0, ds.ignore_index})
        absent = [t for t in things if t not in gt]
        if not gt or not absent:
            continue
        neg = list(gt)
        neg[int(rng.integers(len(neg)))] = absent[int(rng.integers(len(absent)))]
        s = []
        for labels in (gt, sorted(neg)):
            prompt = seg.prompt(ds.classes, labels)
            with torch.no_grad():
                s.append(float(seg.vlm.match_logit(seg.preprocess(image), prompt.input_ids,
                                                   prompt.attention_mask)[0]))
        wins, total = wins + int(s[0] > s[1]), total + 1
    return wins / max(1, total)


def scores(path: Path, maps: str, presence: str, n: int, base: Path) -> dict[tuple, dict]:
    """{(knobs name, layer, head): {miou, fg_acc, point}} over the held-out set."""
    ds = open_dataset("voc21", make_dataset("voc", base / f"voc-heldout-{n}", n=n,
                                            seed=HELD_OUT_SEED))
    seg = segmenter(path, maps)
    L, H = seg.vlm.layers, seg.vlm.heads
    combos = [(k, la, he) for k in KNOBS for la in range(1, L) for he in range(1, H + 1)]
    accs = {c: MiouAccumulator(len(ds.classes.names)) for c in combos}
    fg = {c: [0, 0] for c in combos}
    stats = {(la, he): np.zeros(5) for la in range(1, L) for he in range(1, H + 1)}
    n_present = 0
    for i in range(len(ds)):
        image, label = ds.image(i), ds.label(i)
        gt = sorted(set(np.unique(label).tolist()) - {0, ds.ignore_index})
        present = gt if presence == "gt" else None
        ev = seg.extract(image, ds.classes, present)
        n_present += len(ev.meta["present"])
        for la in range(1, L):
            for he in range(1, H + 1):
                deep = ev.merged(seg.extend(ev, image, ds.classes, present,
                                            {"layer": la, "head": he, "drop_iters": 4}))
                if presence == "gt":
                    stats[la, he] += map_stats(seg, ev, label, la, he)
                for k, knobs in KNOBS.items():
                    pred = np.asarray(seg.decode(deep, {**knobs, "layer": la, "head": he}))
                    accs[k, la, he].update(image, pred, label)
                    m = (label != ds.ignore_index) & (label != 0)
                    fg[k, la, he][0] += int((pred[m] == label[m]).sum())
                    fg[k, la, he][1] += int(m.sum())
    nan = float("nan")
    return {c: {"miou": accs[c].value(), "fg_acc": fg[c][0] / max(1, fg[c][1]),
                "point": stats[c[1:]][0] / n_present if presence == "gt" else nan,
                "inside": stats[c[1:]][1] / n_present if presence == "gt" else nan,
                "cos": stats[c[1:]][2] / max(1, stats[c[1:]][3]) if presence == "gt" else nan,
                "chance": stats[c[1:]][4] / n_present if presence == "gt" else nan}
            for c in combos}


def rows(name: str, res: dict[tuple, dict], chance: list[float]) -> list[str]:
    """Table rows of one (weights, maps, presence); ``chance[0]`` gets the point/inside chance."""
    out = []
    layers = sorted({c[1] for c in res})
    for k in KNOBS:
        for la in layers:
            cs = [c for c in res if c[0] == k and c[1] == la]
            mi = [100 * res[c]["miou"] for c in cs]
            fa = [100 * res[c]["fg_acc"] for c in cs]
            best = max(cs, key=lambda c: res[c]["miou"])
            maps = "| - | - | - |"
            if k == "paper" and not np.isnan(res[cs[0]]["point"]):
                pt, ins, cos = (np.mean([res[c][m] for c in cs]) for m in ("point", "inside",
                                                                            "cos"))
                maps = f"| {100 * pt:.0f} | {100 * ins:.0f} | {cos:.2f} |"
                chance[0] = 100 * res[cs[0]]["chance"]
            out.append(f"| {name} | {k} | {la} | {np.mean(mi):.1f} | {max(mi):.1f} (h{best[2]}) "
                       f"| {np.mean(fa):.0f} {maps}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_blip",
                                description=__doc__.split("\n")[0])
    p.add_argument("--trained", type=Path, required=True)
    p.add_argument("--random", type=Path, required=True)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--presence", default="gt,model")
    p.add_argument("--maps", default="gradcam,attn")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    lines, chance = [], [float("nan")]
    with tempfile.TemporaryDirectory() as tmp:
        itm = {w: itm_accuracy(path, a.n, Path(tmp))
               for w, path in (("trained", a.trained), ("random", a.random))}
        for presence in a.presence.split(","):
            for maps in a.maps.split(","):
                for w, path in (("trained", a.trained), ("random", a.random)):
                    res = scores(path, maps, presence, a.n, Path(tmp))
                    lines += rows(f"{w}, {maps}, {presence}", res, chance)
    print(f"toy BLIP pnp, {a.n} held-out VOC-like images (seed {HELD_OUT_SEED}); per layer the "
          f"mean over heads, the best head; mIoU %, fg pixel accuracy %, pointing game %, "
          f"map mass inside the class %, cosine between two classes' maps")
    print("| weights, maps, presence | knobs | layer | mIoU | best head mIoU | fg acc | point "
          "| inside | cos |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"chance level of point and inside (a class's mean area share of the patches): "
          f"{chance[0]:.0f} %")
    print("held-out ITM accuracy (true prompt vs one class swapped): " +
          ", ".join(f"{w} {100 * v:.0f} %" for w, v in itm.items()))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
