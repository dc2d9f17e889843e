"""Data set specs (``conf/datasets/<name>.yaml``) and the on-disk layouts they name.

A spec is data: class names (index = label value), prompt synonyms, whether label 0 is
background, the label remap (``reduce_zero_label``) and the split names. A layout says where a
family of data sets keeps images and label maps (the mmsegmentation layouts). The ``folder``
data set has no YAML: its class list is ``DIR/classes.txt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from methods.base import (
    CONF_DIR,
    SAME_CLASS,
    SHARED_TEXT,
    ClassSet,
    OvssError,
    class_clash,
    class_key,
)

FOLDER = "folder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Layout:
    """Where images and label maps live, relative to the data root.

    ``{split}`` in a folder name is replaced by the spec's ``splits[split]``. With ``split_list``
    the split value is instead a text file of image ids (one per line, VOC style) and the folders
    hold every split. ``nested``: images sit one folder deeper (Cityscapes' ``<city>/``), and the
    label map mirrors that sub-folder. An image's id is its file name without ``image_suffixes``.
    """

    image_dir: str
    label_dir: str
    image_suffixes: tuple[str, ...]
    label_suffix: str
    split_list: bool = False
    nested: bool = False


LAYOUTS: dict[str, Layout] = {
    "voc": Layout("JPEGImages", "SegmentationClass", (".jpg",), ".png", split_list=True),
    "context": Layout("JPEGImages", "SegmentationClassContext", (".jpg",), ".png",
                      split_list=True),
    "coco_stuff": Layout("images/{split}", "annotations/{split}", (".jpg",),
                         "_labelTrainIds.png"),
    "coco_object": Layout("images/{split}", "annotations/{split}", (".jpg",),
                          "_instanceTrainIds.png"),
    "ade20k": Layout("images/{split}", "annotations/{split}", (".jpg",), ".png"),
    "cityscapes": Layout("leftImg8bit/{split}", "gtFine/{split}", ("_leftImg8bit.png",),
                         "_gtFine_labelTrainIds.png", nested=True),
    FOLDER: Layout("images", "masks", IMAGE_SUFFIXES, ".png"),
}


class DatasetSpec(BaseModel):
    """One ``conf/datasets/<name>.yaml`` (or the spec built from a folder's ``classes.txt``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    layout: str
    classes: list[str] = Field(min_length=1)
    prompts: list[list[str]] = Field(default_factory=list)
    background: bool = False
    ignore_index: int = Field(default=255, ge=0, le=255)
    #: mmseg ``reduce_zero_label``: mask value 0 -> ignore, i -> i - 1.
    reduce_zero_label: bool = False
    #: split name -> folder name (or split list file, for ``split_list`` layouts).
    splits: dict[str, str] = Field(default_factory=lambda: {"val": ""})
    #: stuff names that CLIP-family methods may embed as the background text.
    background_prompts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is unknown (known: {', '.join(LAYOUTS)})")
        if self.prompts and len(self.prompts) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.prompts)} prompt lists")
        if any(not p for p in self.prompts):
            raise ValueError("every class needs at least one prompt")
        if self.background and self.classes[0] != "background":
            raise ValueError("background: true needs classes[0] == 'background'")
        if len(self.classes) > self.ignore_index:
            raise ValueError(f"{len(self.classes)} classes do not fit below ignore_index")
        return self

    def class_set(self) -> ClassSet:
        prompts = self.prompts or [[c] for c in self.classes]
        return ClassSet(names=tuple(self.classes), prompts=tuple(tuple(p) for p in prompts),
                        background=self.background)


def conf_dirs() -> list[Path]:
    """``$OVSS_CONF_PATH`` (colon list) first, then ``conf/``: as for method YAMLs."""
    extra = [Path(p) for p in os.environ.get("OVSS_CONF_PATH", "").split(os.pathsep) if p]
    return [*extra, CONF_DIR]


def known_datasets() -> list[str]:
    names = {p.stem for d in conf_dirs() for p in (d / "datasets").glob("*.yaml")}
    return sorted(names | {FOLDER})


def _spec_path(name: str) -> Path:
    if name and "/" not in name and "\\" not in name and not name.startswith("."):
        for d in conf_dirs():
            path = d / "datasets" / f"{name}.yaml"
            if path.is_file():
                return path
    raise OvssError(f"unknown data set {name!r}: choose one of {', '.join(known_datasets())}")


def load_spec(name: str) -> DatasetSpec:
    """The spec of a named data set (not ``folder``); OvssError naming the YAML if invalid."""
    path = _spec_path(name)
    raw_text = path.read_text()
    try:
        raw = yaml.safe_load(raw_text)
    except yaml.YAMLError as e:
        raise OvssError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise OvssError(f"{path}: expected a mapping of fields")
    try:
        spec = DatasetSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise OvssError(f"{path}: {loc + ': ' if loc else ''}{msg}") from None
    if spec.name != name:
        raise OvssError(f"{path}: name {spec.name!r} differs from the file name {name!r}")
    check_distinct(spec, path, raw_text)
    return spec


def check_distinct(spec: DatasetSpec, path: Path, text: str) -> None:
    """No two classes share a name or a prompt text (methods.base.class_key): OvssError at the
    file and line of the later one."""
    prompts = spec.prompts or [[c] for c in spec.classes]
    clash = class_clash(spec.classes, prompts)
    if clash is None:
        return
    i, j, word = clash
    lines = {f: _item_lines(text, f) for f in ("classes", "prompts")}

    def line(c: int) -> str:
        in_name = class_key(word) == class_key(spec.classes[c])
        found = lines["classes" if in_name or not spec.prompts else "prompts"]
        return str(found[c]) if c < len(found) else "?"

    if class_key(word) == class_key(spec.classes[i]) == class_key(spec.classes[j]):
        raise OvssError(f"{path}:{line(j)}: class {j} {spec.classes[j]!r} repeats class {i} "
                        f"{spec.classes[i]!r} of line {line(i)} ({SAME_CLASS})")
    raise OvssError(f"{path}:{line(j)}: {word!r} of class {j} ({spec.classes[j]}) is also a "
                    f"name or prompt of class {i} ({spec.classes[i]}), line {line(i)} "
                    f"({SHARED_TEXT})")


def _item_lines(text: str, field: str) -> list[int]:
    """The 1-based line of each item of the top-level sequence ``field`` of a YAML text."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == field and isinstance(value, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in value.value]
    return []


def dataset_layout(name: str) -> str:
    """The layout (``voc``, ``context``, ``coco_stuff``, ...) a data set name is stored in."""
    return FOLDER if name == FOLDER else load_spec(name).layout


def folder_spec(root: Path) -> DatasetSpec:
    """``DIR/classes.txt``: one class name per line, mask value i = line i (0-based).

    A first line ``background`` makes label 0 the background class.
    """
    path = root / "classes.txt"
    if not path.is_file():
        raise OvssError(f"class list {path} not found: write one class name per line")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise OvssError(f"cannot read class list {path}: {e}") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise OvssError(f"class list {path} is empty: write one class name per line")
    if "" in lines:
        raise OvssError(f"class list {path}: line {lines.index('') + 1} is empty "
                        "(line i names mask value i-1, so no gaps)")
    background = lines[0].lower() == "background"
    if background:
        lines[0] = "background"
    if len(lines) < (2 if background else 1):
        raise OvssError(f"class list {path} has only 'background': add the classes")
    clash = class_clash(lines)
    if clash is not None:
        i, j, _ = clash
        raise OvssError(f"class list {path}: line {j + 1} {lines[j]!r} repeats line {i + 1} "
                        f"{lines[i]!r} ({SAME_CLASS})")
    try:
        return DatasetSpec(name=FOLDER, layout=FOLDER, classes=lines, background=background)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise OvssError(f"class list {path}: {msg}") from None
