"""The toy method for the two-searches-one-cache test (tests/test_two_searches.py).

Loaded in every Ray worker through ``OVSS_METHOD_MODULES=toy=tests.cache_race_method``. With
``OVSS_TEST_WRITE_LOG`` set, every evidence cache ``put`` appends ``published|discarded <file>``
to that file. With ``OVSS_TEST_BARRIER`` (a directory) and ``OVSS_TEST_SEARCH_ID`` set, ``extract``
waits until two searches have both started extracting, so both miss the same images and race to
publish them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from search.core.cache import EvidenceCache
from tests.toy_method import ToySegmenter


def _log(path: Path, published: bool) -> None:
    with open(os.environ["OVSS_TEST_WRITE_LOG"], "a") as f:
        f.write(f"{'published' if published else 'discarded'} {path.name}\n")


if os.environ.get("OVSS_TEST_WRITE_LOG"):
    EvidenceCache.on_publish = staticmethod(_log)


class RacingToySegmenter(ToySegmenter):
    def extract(self, image, classes, present=None):
        barrier = os.environ.get("OVSS_TEST_BARRIER")
        if barrier:
            d = Path(barrier)
            (d / os.environ.get("OVSS_TEST_SEARCH_ID", str(os.getpid()))).touch()
            deadline = time.time() + 120
            while len(list(d.iterdir())) < 2 and time.time() < deadline:
                time.sleep(0.05)
        return super().extract(image, classes, present)


SEGMENTER = RacingToySegmenter
