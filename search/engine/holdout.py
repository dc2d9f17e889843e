"""Held-out images of a search: kept out of tuning in ``plan_search``, scored after it.

``search.run --holdout N`` (or ``--eval-split S``) keeps images out of tuning (default: a fifth
of them from 20 images on, none below); after tuning the best config and the paper defaults are
scored on them with :mod:`search.engine.scoring` and logged on the parent run as
``holdout_<metric>_best``, ``holdout_<metric>_default`` and ``holdout_<metric>_gap``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from methods.base import OvssError
from search.core.console import percent
from search.engine.scoring import EvalData, image_items, score_config
from search.record.tables import comparison_rows, to_markdown, write_table


def holdout_count(n: int, holdout: int | None) -> int:
    """Images kept out of tuning: ``holdout`` if given, else a fifth of ``n`` when ``n >= 20``,
    else none. OvssError when it leaves nothing to tune on."""
    k = (n // 5 if n >= 20 else 0) if holdout is None else int(holdout)
    if k < 0:
        raise OvssError(f"--holdout {k}: must not be negative")
    if k >= n:
        raise OvssError(f"--holdout {k}: the data set has only {n} image(s), none would be left "
                        "to tune on")
    return k


def split_holdout(args, items: list, data_kwargs: Mapping[str, Any]):
    """(tuning items, held-out :class:`EvalData` or None, a line saying which), before Ray.

    ``--eval-split S`` holds out the images of split S (all of them, or ``--holdout N``);
    otherwise ``holdout_count`` images are drawn with the search's seed from the tuning images.
    The line (held-out image ids) is printed by the search once its input is all accepted."""
    from search.data import open_dataset

    eval_split = getattr(args, "eval_split", None)
    dense = data_kwargs.get("labels") == "dense"
    if eval_split:
        kw = {**data_kwargs, "split": eval_split, "labels": "dense"}
        data = open_dataset(**kw)
        n = len(data) if args.holdout is None else min(int(args.holdout), len(data))
        if n < 1:
            raise OvssError(f"--eval-split {eval_split}: no images to score")
        held = EvalData(kw["name"], kw, data.classes, image_items(data, range(n)))
        return items, held, (f"holdout: {n} image(s) of split {eval_split!r}, scored after "
                             f"tuning: {held.describe()}")
    asked = getattr(args, "holdout", None)
    k = holdout_count(len(items), asked)
    if not dense and asked is None:
        k = 0  # a label-free search holds nothing out unless asked (scoring needs dense labels)
    if k == 0:
        return items, None, (f"holdout: none ({len(items)} images; a fifth are held out from 20 "
                             "images on, or give --holdout N)")
    if not dense:
        raise OvssError("--holdout needs dense label maps to score the held-out images: use "
                        "--reward miou, --fidelity, or --eval-split with a labelled split")
    rng = np.random.default_rng(int(getattr(args, "seed", 0)))
    out = set(rng.choice(len(items), size=k, replace=False).tolist())
    tune_items = [it for i, it in enumerate(items) if i not in out]
    classes = open_dataset(**data_kwargs).classes
    held = EvalData(data_kwargs["name"], dict(data_kwargs), classes,
                    [it for i, it in enumerate(items) if i in out])
    return tune_items, held, (f"holdout: {k} of {len(items)} images kept out of tuning: "
                              f"{held.describe()}")


def holds_out(plan) -> bool:
    """Whether the search keeps images out of tuning to score after it."""
    held = getattr(plan, "holdout", None)
    return held is not None and bool(held.items)


def score_holdout(client, parent_id: str, plan, best_params: Mapping[str, Any]) -> str:
    """Score the best config and the paper defaults on the held-out images; log
    ``holdout_miou_best``, ``holdout_miou_default``, ``holdout_miou_gap`` (and aAcc) and the
    per-class table on the parent run. Returns a summary line ('' when nothing is held out)."""
    from search.core.space import full_params
    from search.record import tracking

    if not holds_out(plan):
        return ""
    held = plan.holdout
    r, args = plan.resolved, plan.args
    base = {"method": r.method, "backbone_name": r.backbone_name, "backbone": r.backbone,
            "settings": r.settings, "dataset": plan.dataset_name}
    best = {**base, "params": full_params(r.defaults, best_params)}
    paper = {**base, "params": dict(r.defaults)}
    kw = {"gpus": args.gpus_per_trial, "cpus": args.cpus_per_trial}
    s_best = score_config(best, held, plan.cache_dir, overlays=0, desc="holdout best", **kw)
    s_paper = score_config(paper, held, plan.cache_dir, overlays=0, desc="holdout default", **kw)
    metrics = {"holdout_miou_best": s_best.miou, "holdout_miou_default": s_paper.miou,
               "holdout_miou_gap": s_best.miou - s_paper.miou,
               "holdout_aacc_best": s_best.aacc, "holdout_aacc_default": s_paper.aacc,
               "holdout_aacc_gap": s_best.aacc - s_paper.aacc, "holdout_images": len(held.items)}
    tracking.log_metrics(client, parent_id, metrics, 0)
    client.set_tag(parent_id, "ovss_holdout_images",
                   ",".join(it.image_id for it in held.items)[:5000])
    rows = comparison_rows({"tuned": s_best, "paper default": s_paper})
    with tempfile.TemporaryDirectory() as d:
        for p in write_table(Path(d), "holdout_table", rows, held.describe()):
            client.log_artifact(parent_id, str(p))
    plan.holdout_table = to_markdown(rows)
    return (f"holdout ({len(held.items)} images): mIoU tuned {percent(s_best.miou)} vs paper "
            f"default {percent(s_paper.miou)} (gap {100 * (s_best.miou - s_paper.miou):+.2f} "
            "points)")
