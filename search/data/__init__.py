"""Data set readers for the mmsegmentation layouts, plus ``folder`` for your own images.

    data = open_dataset("voc21", "/data/VOCdevkit/VOC2012")      # split="val", labels="dense"
    data.classes                  # ClassSet (names, prompts, background)
    data.image(0)                 # HxWx3 uint8 RGB
    data.label(0)                 # HxW int64, values index data.classes.names, 255 = ignore
    data.image_labels(0)          # label values present in image 0

Class lists live in ``conf/datasets/<name>.yaml``; ``search.data.synthetic`` writes tiny data
sets in the same layouts for tests and ``--preset smoke``.

The bottom layer of the search. May import: ``methods`` (``ClassSet``, ``OvssError``, image
I/O). Never another part of ``search``.
"""

from search.data.dataset import (
    DenseLabelsForbidden,
    Record,
    SegDataset,
    open_dataset,
)
from search.data.image_labels import read_image_labels
from search.data.make_image_labels import write_image_labels
from search.data.spec import (
    LAYOUTS,
    DatasetSpec,
    Layout,
    dataset_layout,
    known_datasets,
    load_spec,
)

__all__ = [
    "LAYOUTS",
    "DatasetSpec",
    "DenseLabelsForbidden",
    "Layout",
    "Record",
    "SegDataset",
    "dataset_layout",
    "known_datasets",
    "load_spec",
    "open_dataset",
    "read_image_labels",
    "write_image_labels",
]
