"""One class, one name: names (and prompt texts) that differ only in case, spaces, '-' or '_'
are one class (CLIP's and BERT's tokenizers lower-case, PnP squashes spaces out, image-label
files match names so), and no text may serve two classes. Refused in ClassSet and in every
method-specific rule; the shipped data sets and method settings pass. The entry points (a
folder's classes.txt, a data set YAML, --classes, --present, image-label files, PnP's
prompt_names in a search) are cases of tests/test_bad_input.py."""

from __future__ import annotations

import pytest

from methods.base import ClassSet, OvssError, class_clash, class_key


def test_class_key_is_case_space_hyphen_and_underscore_blind():
    assert class_key("TV-Monitor") == class_key(" tv monitor ") == class_key("tv_monitor") \
        == "tvmonitor"
    assert class_key("cat") != class_key("cats")


def test_class_clash_finds_repeats_and_shared_texts_but_not_synonyms_within_a_class():
    assert class_clash(["cat", "dog", "Cat"]) == (0, 2, "Cat")
    assert class_clash(["water", "sea"], [["water", "sea"], ["sea"]]) == (0, 1, "sea")
    assert class_clash(["a", "b"], [["x"], ["a"]]) == (0, 1, "a")     # b's text is a's name
    assert class_clash(["cat", "dog"], [["cat", "kitty", "Kitty"], ["dog"]]) is None
    assert class_clash(["cat", "dog"]) is None


def test_class_set_refuses_two_classes_with_one_name_or_text():
    with pytest.raises(OvssError, match="class 2 'Cat' repeats class 0 'cat'") as e:
        ClassSet.from_names(["cat", "dog", "Cat"])
    assert "\n" not in str(e.value)
    with pytest.raises(OvssError, match="'sea' is a name or prompt of both class 0"):
        ClassSet(("water", "sea"), (("water", "sea"), ("sea",)))
    with pytest.raises(OvssError, match="'background' is label 0"):
        ClassSet.from_names(["Background", "cat"], background=True)
    assert ClassSet.from_names(["cat", "dog"], background=True).names == ("background", "cat",
                                                                          "dog")


def test_every_shipped_data_set_has_distinct_classes_for_every_method():
    """Every conf/datasets YAML loads (its classes and synonyms distinct), and under each
    method's settings for it (PnP's prompt_names) no two classes become one text."""
    from methods import METHODS, get_segmenter_class
    from methods.spec import load_method_spec
    from search.core.config import resolve
    from search.data.spec import known_datasets, load_spec

    names = [d for d in known_datasets() if d != "folder"]
    assert {"voc21", "ade20k", "coco_stuff164k", "context59"} <= set(names)
    for dataset in names:
        classes = load_spec(dataset).class_set()
        for method in METHODS:
            spec = load_method_spec(method)
            settings = resolve(spec, None, dataset).settings
            get_segmenter_class(method).check_classes(settings, classes)


def test_pnp_refuses_prompt_names_that_make_two_classes_one_word():
    from methods.pnp import SEGMENTER

    classes = ClassSet.from_names(["cat", "dining table", "table"], background=True)
    SEGMENTER.check_classes({}, classes)
    with pytest.raises(OvssError, match="'dining table' and 'table' are both 'table'"):
        SEGMENTER.check_classes({"prompt_names": {"dining table": "table"}}, classes)


def test_evaluate_and_inference_ask_the_method_about_the_classes():
    """search.evaluate / search.transfer check the test data set's classes under the config's
    settings before Ray, and TunedSegmenter.class_set checks the user's classes."""
    from methods.infer import TunedSegmenter
    from methods.pnp import SEGMENTER
    from search.engine.configs import check_classes
    from search.engine.scoring import EvalData

    config = {"method": "pnp", "dataset": "voc21", "settings": {"prompt_names": {"cat": "dog"}}}
    classes = ClassSet.from_names(["cat", "dog"], background=True)
    with pytest.raises(OvssError, match="data set voc21: pnp: classes 'cat' and 'dog'"):
        check_classes(config, EvalData("voc21", {}, classes))
    check_classes({**config, "settings": {}}, EvalData("voc21", {}, classes))
    tuned = object.__new__(TunedSegmenter)                 # no weights needed for the check
    tuned.config, tuned.background = config, True
    tuned.segmenter = object.__new__(SEGMENTER)
    with pytest.raises(OvssError, match="both 'dog'"):
        tuned.class_set(["cat", "dog"])
    assert tuned.class_set(["cat", "cow"]).names == ("background", "cat", "cow")
