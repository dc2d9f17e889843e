"""A test-only method that drives the platform tests: colour-prototype segmentation.

extract: a per-pixel affinity of each class to a class colour (the colour is derived from the
class name, so the generated data sets, which paint class i in a colour, are partly segmentable).
extend: (the knob-dependent stage) smooths the affinities with a box filter of size ``pool``.
decode: softmax with temperature ``temp``, background where the top probability is below ``thr``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, Evidence, OvssError, Segmenter, check_image

CALLS = {"extract": 0, "extend": 0}


def class_colour(name: str) -> np.ndarray:
    h = hashlib.sha256(name.encode()).digest()
    return np.array([h[0], h[1], h[2]], np.float32) / 255.0


class ToySegmenter(Segmenter):
    method = "toy"
    extraction_knobs = ("pool",)

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = dict(settings)

    @classmethod
    def from_spec(cls, backbone, settings, device="cpu"):
        if backbone.get("name") not in ("tiny", "other"):
            raise OvssError(f"unknown toy backbone {backbone.get('name')!r}")
        return cls(settings)

    def settings_key(self):
        return dict(self.settings)

    def _die_once(self, setting: str) -> None:
        """Fault injection: SIGKILL this worker process once, when the file named by the setting
        exists (it is removed first, so Ray's retry of the task / Tune's retry of the trial
        succeeds)."""
        flag = self.settings.get(setting)
        if flag:
            try:
                os.unlink(flag)
            except FileNotFoundError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    def extract(self, image, classes: ClassSet, present: Sequence[int] | None = None):
        CALLS["extract"] += 1
        self._die_once("die_once_extract")
        delay = float(self.settings.get("extract_delay", 0) or 0)
        if delay:
            time.sleep(delay)
        check_image(image)
        img = torch.from_numpy(np.array(image)).float().div(255)   # HxWx3 (a writable copy)
        cols = torch.from_numpy(np.stack([class_colour(p[0]) for p in classes.prompts]))
        aff = -torch.cdist(img.reshape(-1, 3), cols).reshape(*image.shape[:2], -1)
        return Evidence({"affinity": aff.permute(2, 0, 1).contiguous()},
                        {"background": classes.background,
                         "present": None if present is None else [int(c) for c in present]})

    def extend(self, evidence, image, classes, present, knobs):
        CALLS["extend"] += 1
        k = int(knobs["pool"])
        aff = evidence.tensors["affinity"][None]
        sm = F.avg_pool2d(aff, 2 * k + 1, stride=1, padding=k, count_include_pad=False)[0]
        return Evidence({"smoothed": sm.contiguous()}, {"pool": k})

    def decode(self, evidence, params):
        self._die_once("die_once_decode")
        delay = float(self.settings.get("decode_delay", 0) or 0)
        if delay:
            time.sleep(delay)
        flag = self.settings.get("fail_flag")
        if flag and int(params["pool"]) == 2 and Path(flag).exists():
            raise RuntimeError("toy: simulated crash (fail_flag present)")
        aff = evidence.tensors.get("smoothed", evidence.tensors["affinity"])
        prob = torch.softmax(aff / float(params["temp"]), 0)
        scale = {"linear": 1.0, "square": 2.0}[params["mode"]]
        top, arg = (prob ** scale).max(0)
        out = arg.clone()
        if evidence.meta.get("background"):
            out[top < float(params["thr"])] = 0
        return out.numpy().astype(np.int64)


SEGMENTER = ToySegmenter
