"""Bad input, data sets: empty, unreadable, mislabelled, wrong size, outside the root; image
labels; the pixel limit. The harness and the rules every case meets: tests/bad_input.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from methods.base import OvssError
from tests.bad_input import Cases, check_case, png_bomb

CASES = Cases()


# --- data sets: empty, unreadable, mislabelled, wrong size, outside the root ---------------------
@CASES.case("dataset-empty-folder")
def _(w):
    d = w.dir / "mine"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    (d / "classes.txt").write_text("background\ncat\n")
    return ["--method", "toy", "--dataset", "folder", "--data-root", str(d)], (
        "no images", str(d / "images"))


@CASES.case("dataset-empty-split-list")
def _(w):
    w.split_file().write_text("\n")
    return w.toy(root=w.voc()), ("val.txt", "lists no images")


@CASES.case("dataset-empty-class-list")
def _(w):
    d = w.dir / "mine"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "masks" / "a.png")
    (d / "classes.txt").write_text("\n")
    return ["--method", "toy", "--dataset", "folder", "--data-root", str(d)], (
        "classes.txt", "empty")


# --- duplicate classes: one class could never be predicted, and the mIoU would be wrong --------
@CASES.case("dataset-folder-class-twice")
def _(w):
    d = w.dir / "mine"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "masks" / "a.png")
    (d / "classes.txt").write_text("background\ncat\ndog\nCat \n")   # case, spaces: one class
    return ["--method", "toy", "--dataset", "folder", "--data-root", str(d)], (
        "classes.txt", "line 4 'Cat' repeats line 2 'cat'")


def dataset_yaml(w, classes: str, prompts: str) -> list[str]:
    """A data set YAML of its own (found through OVSS_CONF_PATH) over the VOC copy."""
    conf = w.dir / "conf" / "datasets"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        "name: mine\nlayout: voc\nbackground: true\n"
        "splits: {val: ImageSets/Segmentation/val.txt}\n"
        f"classes:\n{classes}prompts:\n{prompts}")
    w.monkeypatch.setenv("OVSS_CONF_PATH", os.pathsep.join(
        [str(w.dir / "conf"), os.environ.get("OVSS_CONF_PATH", "")]))
    return ["--method", "toy", "--dataset", "mine", "--data-root", str(w.voc_src)]


@CASES.case("dataset-yaml-class-twice")
def _(w):
    return dataset_yaml(w, "  - background\n  - tv monitor\n  - dog\n  - TV-Monitor\n",
                        "  - [background]\n  - [tv monitor]\n  - [dog]\n  - [tv]\n"), (
        "mine.yaml:9", "class 3 'TV-Monitor' repeats class 1 'tv monitor' of line 7")


@CASES.case("dataset-yaml-synonym-of-two-classes")
def _(w):
    return dataset_yaml(w, "  - background\n  - cat\n  - dog\n",
                        "  - [background]\n  - [cat, pet]\n  - [dog, pet]\n"), (
        "mine.yaml:12", "'pet' of class 2 (dog)", "class 1 (cat), line 11")


@CASES.case("image-labels-image-twice")
def _(w):
    labels = w.dir / "labels.json"
    ids = [p.stem for p in sorted((w.voc_src / "JPEGImages").iterdir())]
    body = ", ".join(f'"{i}": ["cat"]' for i in ids)
    labels.write_text("{" + body + f', "{ids[2]}": ["dog"]' + "}")
    return w.toy("--reward", "clip", "--image-labels", str(labels)), (
        "labels.json", f"'{ids[2]}' is listed twice")


@CASES.case("image-labels-class-twice")
def _(w):
    labels = w.dir / "labels.json"
    ids = [p.stem for p in sorted((w.voc_src / "JPEGImages").iterdir())]
    labels.write_text(json.dumps({i: ["cat", "Cat"] if i == ids[1] else ["cat"] for i in ids}))
    return w.toy("--reward", "clip", "--image-labels", str(labels)), (
        "labels.json", f"image '{ids[1]}' names class 'cat' twice")


@CASES.case("pnp-prompt-names-give-two-classes-one-word")
def _(w):
    return ["--method", "pnp", "--backbone", "tiny", "--dataset", "voc21", "--data-root",
            str(w.voc_src), "--set", "settings.prompt_names={cat: dog}"], (
        "'cat' and 'dog' are both 'dog' in the prompt",)


@CASES.case("dataset-image-unreadable")
def _(w):
    victim = w.image(2)
    if os.geteuid() == 0:  # root reads a mode-000 file: make the open fail as it would
        import PIL.Image

        real_open = PIL.Image.open

        def denied(fp, *a, **k):
            if Path(fp) == victim:
                raise PermissionError(13, "Permission denied", str(victim))
            return real_open(fp, *a, **k)

        w.monkeypatch.setattr(PIL.Image, "open", denied)
    else:
        victim.chmod(0)
    return w.toy(root=w.voc()), (victim.name, "Permission denied")


@CASES.case("dataset-image-corrupt")
def _(w):
    victim = w.image(1)
    victim.write_bytes(b"not a jpeg at all")
    return w.toy(root=w.voc()), (victim.name, "cannot read image")


@CASES.case("dataset-image-enormous")
def _(w):
    victim = w.image(3)
    png_bomb(victim, 10000, 10000)
    return w.toy(root=w.voc()), (victim.name, "10000x10000", "limit")


@CASES.case("dataset-image-above-env-limit")
def _(w):
    w.monkeypatch.setenv("OVSS_MAX_IMAGE_PIXELS", "5000")
    return w.toy(), ("2007_000000.jpg", "limit of 5000 pixels")


@CASES.case("dataset-label-values-outside-classes")
def _(w):
    victim = w.label(4)
    lab = Image.open(victim)
    a = np.array(lab)
    a[:2, :2] = 30  # voc21 has label values 0..20 and 255
    out = Image.fromarray(a, mode="P") if lab.mode == "P" else Image.fromarray(a)
    if lab.mode == "P":
        out.putpalette(lab.getpalette())
    out.save(victim)
    return w.toy(root=w.voc()), (victim.name, "[30]")


@CASES.case("dataset-label-wrong-size")
def _(w):
    victim = w.label(0)
    lab = Image.open(victim)
    lab.resize((lab.width + 7, lab.height)).save(victim)
    return w.toy(root=w.voc()), (victim.name, "wrong size")


@CASES.case("dataset-label-missing")
def _(w):
    victim = w.label(5)
    victim.unlink()
    return w.toy(root=w.voc()), (victim.name, "no label map")


@CASES.case("dataset-split-list-parent-path")
def _(w):
    # A readable image sits where '../outside' points: it must not be read.
    shutil.copy(w.image(0), w.voc() / "outside.jpg")
    w.split_file().write_text(w.split_file().read_text() + "../outside\n")
    return w.toy(root=w.voc()), ("'../outside'", "outside the data root")


@CASES.case("dataset-split-list-absolute-path")
def _(w):
    shutil.copy(w.image(0), w.dir / "elsewhere.jpg")
    w.split_file().write_text(f"{w.dir / 'elsewhere'}\n" + w.split_file().read_text())
    return w.toy(root=w.voc()), (str(w.dir / "elsewhere"), "outside the data root")


@CASES.case("image-labels-unknown-class")
def _(w):
    labels = w.dir / "labels.json"
    ids = [p.stem for p in sorted((w.voc_src / "JPEGImages").iterdir())]
    labels.write_text(json.dumps({i: ["cat", "unicorn"] for i in ids}))
    return w.toy("--reward", "clip", "--image-labels", str(labels)), ("labels.json",
                                                                      "'unicorn'")


@CASES.case("image-labels-not-json")
def _(w):
    labels = w.dir / "labels.json"
    labels.write_text("{not json")
    return w.toy("--reward", "clip", "--image-labels", str(labels)), ("labels.json",)


@pytest.mark.parametrize("make, cli, stage", CASES.params)
def test_bad_input(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request):
    check_case(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request)


def test_pixel_limit_is_a_header_check(tmp_path, monkeypatch):
    """The limit is ours (below PIL's 89 MP warning), counts width x height, and an image at
    the limit still reads."""
    from methods.io import MAX_IMAGE_PIXELS, image_size, load_image

    assert MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    monkeypatch.setenv("OVSS_MAX_IMAGE_PIXELS", "600")
    assert load_image(path).shape == (20, 30, 3) and image_size(path) == (20, 30)
    monkeypatch.setenv("OVSS_MAX_IMAGE_PIXELS", "599")
    for read in (load_image, image_size):
        with pytest.raises(OvssError, match="a.png is 30x20"):
            read(path)
