"""Options every source takes: limit, remap/drop, carved splits; spec strings; from_arrays."""

from __future__ import annotations

import numpy as np
import pytest

import loadbench
from loadbench.sources.selection import first_n_stratified, parse_remap


def test_digits_is_real_and_embedded():
    source = loadbench.load_source("digits")
    assert source.image_shape == (8, 8, 1)
    assert (source.count("train"), source.count("test")) == (1438, 359)
    images, labels = source.split("train")
    assert images.max() == 255 and images.min() == 0
    assert set(np.unique(images)) <= {round(v * 255 / 16) for v in range(17)}
    again = loadbench.load_source("digits")
    np.testing.assert_array_equal(again.labels("test"), source.labels("test"))


def test_limit_takes_the_first_images_of_every_class():
    labels = np.array([0, 0, 0, 0, 1, 0, 2, 1, 0, 2])
    assert first_n_stratified(labels, 6).tolist() == [0, 1, 4, 6, 7, 9]
    assert first_n_stratified(labels, 4).tolist() == [0, 1, 4, 6]
    assert first_n_stratified(labels, 50).tolist() == list(range(10))
    rare = np.array([0] * 10 + [1])
    assert np.bincount(rare[first_n_stratified(rare, 5)]).tolist() == [4, 1]


def test_limit_on_a_source_keeps_order_and_every_class():
    full = loadbench.load_source("digits")
    small = loadbench.load_source("digits?limit=30")
    assert small.count("train") == small.count("test") == 30
    assert np.bincount(small.labels("train")).tolist() == [3] * 10
    images, _ = small.split("train")
    all_images, all_labels = full.split("train")
    picked = first_n_stratified(all_labels, 30)
    np.testing.assert_array_equal(images, all_images[picked])


def test_remap_and_drop_like_the_fashion_mnist_lab():
    mapping = "upper=0,2,3,4,6;trousers=1;shoes=5,7,9"
    source = loadbench.load_source("digits", remap=mapping, drop="8")
    assert source.classes == ["upper", "trousers", "shoes"]
    full = loadbench.load_source("digits")
    old = full.labels("train")
    assert source.count("train") == int(np.sum(old != 8))
    table = {0: 0, 2: 0, 3: 0, 4: 0, 6: 0, 1: 1, 5: 2, 7: 2, 9: 2}
    np.testing.assert_array_equal(source.labels("train"), [table[v] for v in old if v != 8])
    assert parse_remap(mapping) == {
        "upper": ["0", "2", "3", "4", "6"],
        "trousers": ["1"],
        "shoes": ["5", "7", "9"],
    }
    assert parse_remap('{"a": [0, 1], "b": 2}') == {"a": ["0", "1"], "b": ["2"]}


@pytest.mark.parametrize(
    "options,message",
    [
        ({"remap": "a=0,1;b=2"}, "remap does not say where class(es) '3', '4'"),
        ({"remap": "a=0;b=0,1"}, "mapped or dropped twice"),
        ({"remap": "a=10"}, "unknown class '10'"),
        ({"drop": "ten"}, "unknown class 'ten'"),
        ({"remap": "nonsense"}, "is not NEW=OLD"),
        ({"val_ratio": 1.5}, "option 'val_ratio'"),
        ({"test_ratio": 0.2}, "already has a 'test' split"),
        ({"limt": 3}, "unknown option 'limt'"),
    ],
)
def test_bad_options_are_clear(options, message):
    with pytest.raises(
        loadbench.LoadbenchError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        loadbench.load_source("digits", **options)


def test_a_val_split_is_carved_stratified_and_seeded():
    a = loadbench.load_source("digits", val_ratio=0.25, seed=1001)
    b = loadbench.load_source("digits", val_ratio=0.25, seed=1001)
    c = loadbench.load_source("digits", val_ratio=0.25, seed=7)
    assert a.splits == ["train", "val", "test"]
    assert a.count("train") + a.count("val") == 1438
    assert abs(a.count("val") - 0.25 * 1438) <= 10
    np.testing.assert_array_equal(a.labels("val"), b.labels("val"))
    assert np.bincount(a.labels("val")).min() >= 30
    val_a = a._get("val").indices
    assert not np.array_equal(val_a, c._get("val").indices)
    assert not set(val_a) & set(a._get("train").indices)


def test_spec_options_equal_keyword_options_and_keywords_win():
    a = loadbench.load_source("digits?limit=20&drop=0,1")
    b = loadbench.load_source("digits", limit=20, drop=["0", "1"])
    assert a.spec == b.spec == "digits?drop=0,1&limit=20"
    np.testing.assert_array_equal(a.split("train")[0], b.split("train")[0])
    assert loadbench.load_source("digits?limit=20", limit=10).count("train") == 10


def test_bad_specs():
    with pytest.raises(loadbench.LoadbenchError, match="takes no argument"):
        loadbench.load_source("digits:/tmp")
    with pytest.raises(loadbench.LoadbenchError, match="needs PATH"):
        loadbench.load_source("cifar10")
    with pytest.raises(loadbench.LoadbenchError, match="write folder:"):
        loadbench.load_source("/tmp")


def test_from_arrays_builds_a_source():
    images = np.zeros((4, 3, 2), dtype=np.uint8)
    source = loadbench.from_arrays({"train": (images, [0, 1, 0, 1])}, classes=["cat", "dog"])
    assert source.image_shape == (3, 2, 1) and source.classes == ["cat", "dog"]
    with pytest.raises(loadbench.LoadbenchError, match="must be uint8"):
        loadbench.from_arrays({"train": (images.astype(float), [0, 1, 0, 1])})
    with pytest.raises(loadbench.LoadbenchError, match="4 images but 3 labels"):
        loadbench.from_arrays({"train": (images, [0, 1, 0])})
    with pytest.raises(loadbench.LoadbenchError, match="labels outside 0..1"):
        loadbench.from_arrays({"train": (images, [0, 1, 2, 0])}, classes=["a", "b"])
