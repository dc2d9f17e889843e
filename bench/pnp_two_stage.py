"""The two-stage search of `pnp` against the naive search and against the reference's own search
procedure, on the real-size BLIP-base ITM (``python bench/pnp.py``; the one-stage bench of the
first release is ``python bench/pnp.py --one-stage``).

    python bench/pnp.py                           # 4 images, 64 trials, top 4 re-ranked
    python bench/pnp.py --images 1 --trials 8 --rerank-top 2    # quick look

Model, images, classes and the trial draw are those of the one-stage bench (bench/pnp.py).
Every image gets a fixed synthetic label map (blocks of the 5 classes and background) so trials
have an mIoU to be ranked by; the timings do not depend on it.

- ours (search/engine/rerank.py): stage 1, the proxy of conf/methods/pnp.yaml (``drop_iters: 1``,
  ``crf: false``, its settings): extract every image once, then per trial decode and score
  (no extend: D = 1); stage 2, the --rerank-top best trials with the full pipeline (D = 4, CRF):
  extract again if the proxy's settings change the evidence key, then per trial and image the
  drop chain (``extend``, cached) and decode with the CRF, and score.
- naive: per trial the whole D = 4 + CRF pipeline (methods/pnp/reference.py: each pass the
  reference code's GradCAM pass with a full backward to the image), timed on the re-ranked
  winner on every image (compared with ours' label maps) and scaled to every trial (its cost does
  not depend on the knobs).
- reference search procedure (the reference's own tuning, PnP_OVSS_0514_updated_segmentation.py
  L1229-1311 at HEAD e439962): one pass per image (the reference pass, full backward; timed), then
  per trial only thresholding and scoring, costed as ours' stage-1 decode and score (the same
  work: threshold, resize, blur, score; its CLIP scoring is not counted). It does not re-rank.
The last line is ``ratio=<naive/ours> evidence_mb=<MB per image>`` (MB = 10^6 bytes of cache
files: both base evidences and every cached drop chain); the line before it gives the ratio
against the reference's own search procedure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import smooth_image
from bench.pnp_common import CLASSES, trials
from methods.base import ClassSet
from methods.pnp.backbone import random_model, tiny_tokenizer
from methods.pnp.reference import naive_segment, single_head_gradcam
from methods.pnp.segmenter import PnPSegmenter
from methods.spec import load_method_spec
from rewards.miou import MiouAccumulator
from search.core.cache import EvidenceCache, evidence_key
from search.core.config import resolve, resolve_proxy
from search.engine.rerank import pick_winner, rerank_report


def block_labels(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """A fixed label map: 4 x 5 blocks of values in [0, n]. HxW int64."""
    small = rng.integers(0, n + 1, (4, 5))
    rows = np.minimum(np.arange(h) * 4 // h, 3)
    cols = np.minimum(np.arange(w) * 5 // w, 4)
    return small[rows[:, None], cols[None, :]].astype(np.int64)


class Clock:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.t[name] = self.t.get(name, 0.0) + now - since
        return now


def two_stage(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--rerank-top", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--drop-iters", type=int, default=4, help="D of the full pipeline")
    ap.add_argument("--size", default="375x500", help="image HxW before resizing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    spec = load_method_spec("pnp")
    proxy = resolve_proxy(spec, resolve(spec, backbone="blip-base-flickr", dataset="voc21"))

    from transformers import BlipConfig

    t0 = time.perf_counter()
    vlm = random_model("blip", BlipConfig(text_config={"num_attention_heads": 12}),
                       tiny_tokenizer("blip"), args.seed)
    full_seg = PnPSegmenter(vlm, {"name": "blip-base-random"}, {"image_size": args.image_size})
    proxy_seg = PnPSegmenter(vlm, {"name": "blip-base-random"},
                             {"image_size": args.image_size, **proxy.settings})
    t_build = time.perf_counter() - t0
    classes = ClassSet.from_names(CLASSES, background=True)
    present = list(classes.foreground)
    rng = np.random.default_rng(args.seed)
    images = [smooth_image(rng, h, w) for _ in range(args.images)]
    labels = [block_labels(rng, h, w, len(CLASSES)) for _ in images]
    full_plan = trials(args.trials, args.seed, args.drop_iters, True)
    proxy_plan = [{**p, **proxy.set} for p in full_plan]
    k = min(args.rerank_top, len(full_plan))
    print(f"pnp two-stage bench: BLIP-base ITM (random weights, {vlm.layers} text layers x "
          f"{vlm.heads} heads), {args.images} images {h}x{w} -> {args.image_size}px, "
          f"{len(CLASSES)} classes, {len(full_plan)} proxy trials ({proxy.model_dump()}) + top "
          f"{k} re-ranked at D={args.drop_iters} with CRF, {torch.get_num_threads()} threads; "
          f"model built in {t_build:.1f} s (not counted)")

    clock = Clock()
    n_cls = len(classes.names)
    with tempfile.TemporaryDirectory(prefix="pnp-bench2-") as tmp:
        cache = EvidenceCache(tmp, memory_mb=0)           # every read comes from the disk files

        def base(seg, i, img):
            key = evidence_key(f"img{i}", "pnp", seg.settings_key(), {"present": present})
            ev = cache.get("pnp", key)
            if ev is None:
                ev = seg.extract(img, classes, present)
                cache.put("pnp", key, ev)
            return ev

        # Stage 1: the proxy search.
        accs = [MiouAccumulator(n_cls) for _ in proxy_plan]
        for i, (img, lab) in enumerate(zip(images, labels)):
            t = time.perf_counter()
            ev = base(proxy_seg, i, img)
            t = clock.add("proxy_extract", t)
            for p, acc in zip(proxy_plan, accs):
                pred = proxy_seg.decode(cache.get("pnp", evidence_key(
                    f"img{i}", "pnp", proxy_seg.settings_key(), {"present": present})), p)
                t = clock.add("proxy_decode", t)
                acc.update(None, pred, label=lab)
                t = clock.add("proxy_score", t)
        proxy_scores = [a.value() for a in accs]
        order = sorted(range(len(proxy_plan)), key=lambda j: -proxy_scores[j])[:k]
        # Stage 2: the full pipeline on the top k.
        faccs = [MiouAccumulator(n_cls) for _ in order]
        ours_labels: dict[tuple[int, int], np.ndarray] = {}
        chains = 0
        for i, (img, lab) in enumerate(zip(images, labels)):
            t = time.perf_counter()
            ev = base(full_seg, i, img)
            t = clock.add("full_extract", t)
            for j, acc in zip(order, faccs):
                p = full_plan[j]
                knobs = full_seg.extraction_subset(p)
                key = evidence_key(f"img{i}", "pnp", full_seg.settings_key(),
                                   {"present": present, **knobs})
                extra = cache.get("pnp", key)
                if extra is None:
                    chains += 1
                    extra = full_seg.extend(ev, img, classes, present, knobs)
                    cache.put("pnp", key, extra)
                t = clock.add("full_extend", t)
                ours_labels[(i, j)] = full_seg.decode(ev.merged(extra), p)
                t = clock.add("full_decode", t)
                acc.update(None, ours_labels[(i, j)], label=lab)
                t = clock.add("full_score", t)
        full_scores = [a.value() for a in faccs]
        winner = order[pick_winner([{"score": s} for s in full_scores])]
        # The naive search's cost: the whole pipeline of the winner on every image.
        agree, t_naive, t_ref_pass = [], 0.0, 0.0
        for i, img in enumerate(images):
            t = time.perf_counter()
            lab = naive_segment(full_seg, img, classes, full_plan[winner], present)
            t_naive += time.perf_counter() - t
            agree.append(float((lab == ours_labels[(i, winner)]).mean()))
            prompt = full_seg.prompt(classes, present)
            t = time.perf_counter()
            single_head_gradcam(full_seg, full_seg.preprocess(img), prompt, 0, 0)
            t_ref_pass += time.perf_counter() - t
        mb = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors")) / 1e6 / len(images)
    c = clock.t
    n1, n2 = len(images) * len(proxy_plan), len(images) * k
    stage1 = c["proxy_extract"] + c["proxy_decode"] + c["proxy_score"]
    stage2 = c["full_extract"] + c["full_extend"] + c["full_decode"] + c["full_score"]
    ours = stage1 + stage2
    print(f"ours stage 1 (proxy): extract {c['proxy_extract']:.1f} s + {n1} decodes "
          f"{c['proxy_decode']:.1f} s ({1000 * c['proxy_decode'] / n1:.0f} ms each) + scoring "
          f"{c['proxy_score']:.1f} s = {stage1:.1f} s")
    print(f"ours stage 2 (top {k}, D={args.drop_iters}, CRF): extract {c['full_extract']:.1f} s + "
          f"{chains} drop chains {c['full_extend']:.1f} s + {n2} decodes {c['full_decode']:.1f} s "
          f"+ scoring {c['full_score']:.1f} s = {stage2:.1f} s; ours total {ours:.1f} s")
    rep = rerank_report([proxy_scores[j] for j in order], full_scores)
    print(f"proxy vs full on the top {k}: proxy mIoU {[round(proxy_scores[j], 4) for j in order]}"
          f", full {[round(s, 4) for s in full_scores]}, spearman={rep['rerank_spearman']:.3f} "
          f"kendall={rep['rerank_kendall']:.3f} regret={rep['rerank_regret']:.4f}")
    per = t_naive / len(images)
    naive = per * n1 + (c["proxy_score"] / n1) * n1
    print(f"naive: timed {len(images)} whole-pipeline runs (D={args.drop_iters}, CRF; the "
          f"winner on every image), {per:.2f} s each, scaled to {len(images)} x "
          f"{len(full_plan)} = {naive:.1f} s with scoring; label agreement with ours "
          f"{100 * np.mean(agree):.2f}%")
    per_pass = t_ref_pass / len(images)
    reference = t_ref_pass + c["proxy_decode"] + c["proxy_score"]
    print(f"reference search procedure: {len(images)} reference passes (full backward) "
          f"{t_ref_pass:.1f} s ({per_pass:.2f} s each) + per trial threshold, blur and score "
          f"as ours' stage 1 {c['proxy_decode'] + c['proxy_score']:.1f} s = {reference:.1f} s "
          f"(no re-ranking); ratio_vs_reference_search={reference / ours:.2f}")
    print(f"ratio={naive / ours:.1f} evidence_mb={mb:.2f}")
    return 0
