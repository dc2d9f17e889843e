"""A test-only method whose cost is known: the toy method (tests/toy_method.py) with sleeps of a
set length in each part of the pipeline, so the seconds per image a search measures can be
checked against the sum of the sleeps (docs/cost.md).

- ``extract`` sleeps ``settings.extract_delay`` seconds (the toy's own setting);
- ``extend`` sleeps ``settings.extend_delay * pool`` seconds (``pool`` is an extraction knob);
- ``decode`` sleeps ``settings.decode_step * work`` seconds (``work`` is a decode knob that
  changes nothing else), after the toy's decode.
"""

from __future__ import annotations

import time

from tests.toy_method import ToySegmenter


class ToyCostSegmenter(ToySegmenter):
    method = "toycost"

    def extend(self, evidence, image, classes, present, knobs):
        time.sleep(float(self.settings.get("extend_delay", 0)) * int(knobs["pool"]))
        return super().extend(evidence, image, classes, present, knobs)

    def decode(self, evidence, params):
        out = super().decode(evidence, params)
        time.sleep(float(self.settings.get("decode_step", 0)) * int(params["work"]))
        return out


SEGMENTER = ToyCostSegmenter
