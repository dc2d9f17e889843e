"""``python -m search.data.make_image_labels``: derive image-level labels from dense label maps.

    python -m search.data.make_image_labels --dataset voc21 --data-root /data/VOC2012

writes ``DATA_ROOT/image_labels.json`` (``{image_id: [class names]}``), the file a label-free
search (``--reward clip``) reads instead of the dense label maps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from methods.base import OvssError
from search.data.dataset import SegDataset, open_dataset


def write_image_labels(dataset: SegDataset, path: str | os.PathLike | None = None) -> Path:
    """Write ``{image_id: [class names]}`` derived from the dense label maps of ``dataset``.

    Default path: ``<data root>/image_labels.json``. Returns the path written.
    """
    out = Path(path) if path is not None else dataset.root / "image_labels.json"
    names = dataset.classes.names
    data = {image_id: [names[v] for v in dataset.image_labels(i)]
            for i, image_id in enumerate(dataset.ids())}
    from methods.io import atomic_write

    atomic_write(out, json.dumps(data, indent=1) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.data.make_image_labels",
                                description="Derive image-level labels from dense label maps.")
    p.add_argument("--dataset", required=True, help="data set name (voc21, ..., folder)")
    p.add_argument("--data-root", required=True, help="root directory of the data set")
    p.add_argument("--split", default="val", help="split (default: val)")
    p.add_argument("--out", help="output JSON (default: DATA_ROOT/image_labels.json)")
    args = p.parse_args(argv)
    try:
        data = open_dataset(args.dataset, args.data_root, args.split, labels="dense")
        out = write_image_labels(data, args.out)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(data)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
