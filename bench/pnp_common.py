"""Shared by the PnP-OVSS benches (bench/pnp.py, bench/pnp_two_stage.py): the classes of the
synthetic images and the trials (the paper's solution first, then draws from its space)."""

from __future__ import annotations

import numpy as np

from methods.spec import load_method_spec
from search.core.config import resolve
from search.core.space import sample_value

CLASSES = ("person", "dog", "car", "pottedplant", "sofa")


def trials(n: int, seed: int, drop_iters: int, crf: bool, layers: int = 12,
           heads: int = 12) -> list[dict]:
    """Trial 0: the paper's solution; then draws from the paper's space, layer and head kept
    within ``layers`` - 1 and ``heads`` (the tiny model of ``--tiny`` is smaller)."""
    r = resolve(load_method_spec("pnp"), backbone="blip-base-flickr", dataset="voc21")
    rng = np.random.default_rng(seed)
    fixed = {"drop_iters": drop_iters, "crf": crf}
    out = [{**r.defaults, **fixed}]
    while len(out) < n:
        out.append({**r.defaults, **fixed, **{k: sample_value(p, rng) for k, p in r.space.items()}})
    return [{**p, "layer": min(int(p["layer"]), layers - 1), "head": min(int(p["head"]), heads)}
            for p in out[:n]]
