"""Estimated vs measured seconds per image: what a cost-aware search logs for a config
(``cost/seconds_per_image``: the cost probe's ``extract`` median + ``extend`` median + the trial's
decode median, search/core/trial.py) against a timed ``methods.infer`` run of the same config
(``TunedSegmenter(config)(image, classes)``: extract, extend and decode on each image, median).

    python bench/cost.py --method clipseg [--configs 4] [--images 6] [--threads 1]
                         [--device cpu] [--set KEY=VALUE ...] [--config KNOB=V[,KNOB=V]]

The method's ``smoke`` preset (tiny random-weight backbone of the real model class, generated
data) in a temporary directory; the paper defaults plus ``--configs`` random configs of the
search space (seeded). Per config the estimate and the timed inference run back to back, in an
order that alternates from config to config. ``--config pamr_steps=10`` adds the defaults with
those knobs changed (repeatable). ``--threads`` torch threads (1: a Ray worker with
one CPU, what the search's probe and trials get). Prints one row per config and the ratio
estimate / measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere


def estimate(ctx, params) -> dict[str, float]:
    """The search's cost of ``params``: a trial's ``cost/*`` results (search/core/trial.py)."""
    from search.core.trial import evaluate

    reports: list = []
    evaluate(ctx, params, reports.append)
    return {k: v for k, v in reports[-1].items() if k.startswith("cost/")}


def measure(tuned, images, classes, params) -> float:
    """Median seconds of ``methods.infer``'s call on each image, after one untimed call."""
    from search.core.cost import synchronize

    tuned.params = dict(params)
    tuned(images[0], classes)
    out = []
    for image in images:
        synchronize(tuned.device)
        t0 = time.perf_counter()
        tuned(image, classes)
        synchronize(tuned.device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="clipseg")
    p.add_argument("--configs", type=int, default=4, help="random configs besides the defaults")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--config", action="append", default=[],
                   help="KNOB=V[,KNOB=V]: the defaults with these knobs, as one more config")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from methods.infer import TunedSegmenter
    from search.core.space import full_params, parse_value, sample_value
    from search.core.trial import extract_item, extraction_cost, get_dataset
    from search.engine.plan import plan_search
    from search.engine.search import search_context
    from search.run import build_parser

    work = Path(tempfile.mkdtemp(prefix="ovss-bench-cost-"))
    os.chdir(work)
    argv = ["--method", a.method, "--preset", "smoke", "--max-images", str(a.images),
            "--rungs", "1", "--cache-dir", str(work / "cache"),
            *sum((["--set", s] for s in a.set), [])]
    plan = plan_search(build_parser().parse_args(argv))
    ctx = search_context(plan, a.device)
    for item in ctx.items:                 # the extraction pass, in this process
        extract_item(ctx, item)
    probe = extraction_cost(ctx)
    ctx.cost_extract = probe
    r = plan.resolved
    rng = np.random.default_rng(a.seed)
    configs = [dict(r.defaults)] + [
        full_params(r.defaults, {k: sample_value(v, rng) for k, v in r.space.items()})
        for _ in range(a.configs)]
    for text in a.config:
        knobs = dict(kv.split("=", 1) for kv in text.split(","))
        configs.append(full_params(r.defaults, {k: parse_value(v, r.space[k]) if k in r.space
                                                else type(r.defaults[k])(v)
                                                for k, v in knobs.items()}))
    data = get_dataset(ctx)
    images = [data.image(it.index) for it in ctx.items]
    classes = ctx.class_set
    tuned = TunedSegmenter({"method": r.method, "backbone": r.backbone, "settings": r.settings,
                            "params": configs[0], "classes": plan.classes.to_dict()}, a.device)
    print(f"{a.method} smoke ({r.backbone_name}), {len(images)} images "
          f"{images[0].shape[1]}x{images[0].shape[0]}, {a.threads} torch thread(s), "
          f"{a.device}; probe: extract {probe['seconds']:.4f} s on {probe['device_kind']}")
    print("| config | extract | extend | decode | estimate s/img | infer s/img | est/infer |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for i, params in enumerate(configs):
        if i % 2:          # alternate which of the two runs first
            meas = measure(tuned, images, classes, params)
            est = estimate(ctx, params)
        else:
            est = estimate(ctx, params)
            meas = measure(tuned, images, classes, params)
        total = est["cost/seconds_per_image"]
        ratios.append(total / meas)
        name = "paper defaults" if i == 0 else f"defaults, {a.config[i - 1 - a.configs]}" \
            if i > a.configs else ", ".join(
            f"{k}={params[k]:.3g}" if isinstance(params[k], float) else f"{k}={params[k]}"
            for k in r.space)
        print(f"| {name} | {est['cost/extract_s']:.4f} | {est['cost/extend_s']:.4f} | "
              f"{est['cost/decode_s']:.4f} | {total:.4f} | {meas:.4f} | {ratios[-1]:.2f} |")
    print(f"estimate / infer: median {statistics.median(ratios):.2f}, range "
          f"{min(ratios):.2f}..{max(ratios):.2f} over {len(ratios)} configs")


if __name__ == "__main__":
    main()
