"""A format is one module plus at most one registration line: here a throwaway format, registered
from this test module, is listed, converted, opened, verified and read like the built-in ones,
and the registry-driven tests of test_formats.py pass on it unchanged."""

from __future__ import annotations

import inspect
import io
import os

import numpy as np
import pytest

import loadbench
import test_formats as contract
from loadbench.formats import (
    DTYPES,
    Format,
    SplitReader,
    SplitWriter,
    expand_names,
    format_names,
    get_format,
    register_format,
    unregister_format,
)
from loadbench.formats.base import SplitLayout
from loadbench.options import Option

NAME = "test-raw"


class RawWriter(SplitWriter):
    """The split's stored pixels as one headerless file, its labels as a .npy."""

    def __init__(self, layout: SplitLayout):
        self.layout = layout
        self.file = open(os.path.join(layout.root, f"{layout.split}.bin"), "wb")  # noqa: SIM115
        self.labels: list[np.ndarray] = []

    def write(self, images, labels):
        self.file.write(np.ascontiguousarray(images).tobytes())
        self.labels.append(np.asarray(labels, dtype=np.int64))
        return images

    def close(self):
        self.file.close()
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        np.save(os.path.join(self.layout.root, f"{self.layout.split}-labels.npy"), labels)
        return {"padding": self.layout.options["padding"]}


class RawReader(SplitReader):
    def _open(self):
        labels = np.load(io.BytesIO(self.files.read(f"{self.split}-labels.npy")))
        data = np.frombuffer(self.files.read(f"{self.split}.bin"), dtype=DTYPES[self.dtype])
        return {"images": data.reshape(self.count, *self.image_shape), "labels": labels}

    def labels(self):
        return self.handle["labels"].astype(np.int64)

    def read_items(self, indices):
        h = self.handle
        return h["images"][indices].copy(), h["labels"][indices]


class RawFormat(Format):
    name = NAME
    summary = "test: raw pixels, one file per split"
    options = {"padding": Option(0, "an option that changes nothing", kind=int, minimum=0)}
    writer_class = RawWriter
    reader_class = RawReader


# The registry-driven tests of test_formats.py, run here on the registered format.
CONTRACT = [
    contract.test_round_trip_every_split,
    contract.test_batches_and_items_agree_as_float_tensors,
    contract.test_dataloader_with_two_workers_after_the_parent_read,
    contract.test_datasets_pickle_without_open_handles,
    contract.test_labels_come_back_without_reading_images,
]


@pytest.fixture(scope="module")
def registered():
    register_format(RawFormat)  # the one registration line a new format module has
    try:
        yield get_format(NAME)
    finally:
        unregister_format(NAME)


@pytest.fixture(scope="module")
def raw_stores(registered, tmp_path_factory, rgb_source):
    root = tmp_path_factory.mktemp("raw")
    return {
        (NAME, dtype): loadbench.convert(rgb_source, NAME, root / dtype, dtype, padding=3)
        for dtype in registered.dtypes
    }


def test_every_peer_module_is_a_registered_peer():
    """A peer is its module in `peers/` (and its pip extra): the registry finds it."""
    from loadbench.formats import peer_modules, peer_names

    assert peer_modules() and all(not m.rsplit(".", 1)[1].startswith("_") for m in peer_modules())
    assert {type(get_format(name)).__module__ for name in peer_names()} == set(peer_modules())


def test_the_registry_lists_a_registered_format(registered):
    assert NAME in format_names() and NAME in expand_names(["all"])
    assert get_format(NAME) is registered
    assert registered.parse_options({"padding": "2"}) == {"padding": 2}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("check", CONTRACT, ids=[c.__name__ for c in CONTRACT])
def test_the_format_tests_pass_on_a_registered_format(check, dtype, raw_stores, rgb_source):
    given = {"stores": raw_stores, "rgb_source": rgb_source, "name": NAME, "dtype": dtype}
    check(**{name: given[name] for name in inspect.signature(check).parameters})


def test_a_registered_format_converts_verifies_and_trains(raw_stores, rgb_source, tmp_path):
    store = raw_stores[NAME, "float16"]
    assert store.manifest.options == {"padding": 3}
    checks = loadbench.verify_path(store.path, rgb_source)
    assert [c.problems for c in checks] == [[], []] and all(c.exact_images for c in checks)
    from loadbench.training.config import TrainConfig
    from loadbench.training.train import train

    config = TrainConfig(data=store.path, widths="4", epochs=1, out=str(tmp_path / "run"))
    result = train(config)
    assert len(result.history) == 1 and result.history[0]["images"] == 40


def test_a_forgotten_format_is_gone(registered):
    unregister_format(NAME)
    try:
        with pytest.raises(loadbench.LoadbenchError, match=f"unknown format '{NAME}'"):
            get_format(NAME)
    finally:
        register_format(RawFormat)
