"""What a clipseg search can reach, decided before Ray starts (``search_settings``).

- ``settings.variants``: the ``attention`` values the space samples (and trial 0's); extract
  stores only the evidence those read (variants.py).
- ``settings.scclip_layers``: the values SC-CLIP's index knobs can take, ``{pre, post, start,
  end}: [lo, hi]``; extract stores the Grams and fused-sum pieces of those layers only
  (scclip.py). null outside a search: every layer.

Both are extraction settings (in the evidence key), filled here when null and checked against
the space when given. Every reachable knob value is checked too, so an out-of-range layer index,
overlapping fused ranges, an empty dilation list or a negative PAMR step count fails as one
line before any work (not in a trial).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from methods.base import OvssError
from methods.clipseg.scclip import RANGE_KNOBS, full_layers
from methods.clipseg.variants import VARIANTS, check_variants
from methods.open_clip_backbone import TINY_DEFAULTS
from methods.pamr import parse_dilations


def reach(knob: str, defaults: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]
          ) -> list[Any]:
    """The values a knob can take in a search: a categorical's choices, a numeric knob's
    [low, high], a fixed knob's default (space entries as plain dicts: ``type``, ``low`` /
    ``high`` or ``choices``)."""
    p = space.get(knob)
    if p is None:
        return [defaults[knob]]
    if p.get("type") == "categorical":
        return list(p["choices"])
    return [p["low"], p["high"]]


def model_layers(backbone: Mapping[str, Any]) -> int | None:
    """The ViT's number of blocks from the backbone entry, without loading weights (a tiny
    config, or open_clip's model config file); None when it cannot be told."""
    if backbone.get("tiny") is not None:
        return int({**TINY_DEFAULTS, **dict(backbone["tiny"] or {})}["layers"])
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None or not backbone.get("model"):
        return None
    path = Path(spec.origin).parent / "model_configs" / f"{backbone['model']}.json"
    try:
        return int(json.loads(path.read_text())["vision_cfg"]["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bounds(num_layers: int | None) -> dict[str, list[int]] | None:
    return None if num_layers is None else full_layers(num_layers)


def check_scclip_settings(settings: Mapping[str, Any], variants: tuple[str, ...],
                          num_layers: int) -> dict[str, list[int]] | None:
    """SC-CLIP's extraction settings for an L-block ViT (OvssError naming the setting): the
    LOF's ``lof_neighbors`` (>= 1) and ``lof_contamination`` (in (0, 1)), and
    ``scclip_layers`` resolved: None when scclip is not among ``variants``; every layer when
    null; else ``{pre, post, start, end}: [lo, hi]`` inside the ViT's layers."""
    if "scclip" not in variants:
        return None
    k, c = settings.get("lof_neighbors"), settings.get("lof_contamination")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise OvssError(f"clipseg: settings.lof_neighbors must be an integer >= 1, got {k!r}")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1:
        raise OvssError(f"clipseg: settings.lof_contamination must be in (0, 1), got {c!r}")
    value = settings.get("scclip_layers")
    bounds = full_layers(num_layers)
    if value is None:
        return bounds
    if not isinstance(value, Mapping) or set(value) != set(RANGE_KNOBS):
        raise OvssError(f"clipseg: settings.scclip_layers must map {sorted(RANGE_KNOBS)} to "
                        f"[lo, hi], got {value!r}")
    out = {}
    for part, (b_lo, b_hi) in bounds.items():
        r = value[part]
        ok = (isinstance(r, (list, tuple)) and len(r) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in r))
        if not ok or not b_lo <= r[0] <= r[1] <= b_hi:
            raise OvssError(f"clipseg: settings.scclip_layers.{part} {r!r}: must be [lo, hi] "
                            f"with {b_lo} <= lo <= hi <= {b_hi} ({RANGE_KNOBS[part]} on "
                            f"{num_layers} blocks)")
        out[part] = [int(r[0]), int(r[1])]
    return out


def _int_range(knob: str, values: list[Any]) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise OvssError(f"clipseg: {knob} takes integers, got {values}")
    return [min(values), max(values)]


def _scclip_ranges(defaults, space, num_layers: int | None) -> dict[str, list[int]]:
    ranges = {part: _int_range(knob, reach(knob, defaults, space))
              for part, knob in RANGE_KNOBS.items()}
    bounds = _bounds(num_layers)
    for part, (lo, hi) in ranges.items():
        b_lo, b_hi = bounds[part] if bounds else (0 if part != "end" else 1, hi)
        if lo < b_lo or hi > b_hi:
            raise OvssError(f"clipseg: {RANGE_KNOBS[part]} reaches {lo}..{hi}; the ViT's "
                            f"layers allow {b_lo}..{b_hi}")
    if ranges["start"][1] >= ranges["end"][0]:
        raise OvssError(f"clipseg: multi_start_idx reaches {ranges['start'][1]} and "
                        f"multi_end_idx {ranges['end'][0]}: every end must exceed every start "
                        f"(give multi_end_idx's low above multi_start_idx's high)")
    return ranges


def search_settings(backbone: Mapping[str, Any], settings: Mapping[str, Any],
                    defaults: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, Any]:
    """``settings`` with ``variants`` and ``scclip_layers`` filled from what the space reaches
    (kept when given, after checking they hold it); OvssError naming the first knob value no
    trial could decode."""
    out = dict(settings)
    attention = reach("attention", defaults, space)
    unknown = [a for a in attention if a not in VARIANTS]
    if unknown:
        raise OvssError(f"clipseg: attention {unknown} is not a variant; choose from "
                        f"{list(VARIANTS)}")
    if out.get("variants") is None:
        out["variants"] = [v for v in VARIANTS if v in attention]
    held = check_variants(out["variants"])
    if set(attention) - set(held):
        raise OvssError(f"clipseg: settings.variants {list(held)} lacks attention "
                        f"{sorted(set(attention) - set(held))} that the search samples")
    num_layers = model_layers(backbone)
    if {"kk_mid", "cra"} & set(attention) and num_layers is not None:
        lo, hi = _int_range("layer", reach("layer", defaults, space))
        if lo < 1 or hi > num_layers - 1:
            raise OvssError(f"clipseg: layer reaches {lo}..{hi}; the ViT's blocks allow "
                            f"1..{num_layers - 1}")
    steps = _int_range("pamr_steps", reach("pamr_steps", defaults, space))
    if steps[0] < 0:
        raise OvssError(f"clipseg: pamr_steps reaches {steps[0]}: must be 0 (off) or more")
    if steps[1] > 0:
        for d in reach("pamr_dilations", defaults, space):
            parse_dilations(d)
    if "scclip" in attention:
        ranges = _scclip_ranges(defaults, space, num_layers)
        given = out.get("scclip_layers")
        if given is None:
            out["scclip_layers"] = ranges
        elif num_layers is not None:
            have = check_scclip_settings(out, held, num_layers) or {}
            for part, (lo, hi) in ranges.items():
                if lo < have[part][0] or hi > have[part][1]:
                    raise OvssError(f"clipseg: settings.scclip_layers.{part} {have[part]} "
                                    f"lacks {RANGE_KNOBS[part]} {lo}..{hi} of the search")
    return out
