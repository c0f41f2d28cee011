"""Conversion is atomic, reuses identical stores, refuses to clobber, and records a manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import loadbench
from loadbench.checksums import ContentHash, checksum_block
from loadbench.conversion import convert_many
from loadbench.formats.npy import NpyWriter


def test_manifest_describes_the_store(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "hdf5", tmp_path / "s", "float16")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["loadbench_store"] == 1
    assert (m["format"], m["dtype"], m["image_shape"]) == ("hdf5", "float16", [12, 12, 3])
    assert m["classes"] == rgb_source.classes
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 40, "test": 12}
    assert m["splits"]["train"]["label_counts"] == np.bincount(rgb_source.labels("train")).tolist()
    assert m["source"]["spec"] == rgb_source.spec
    assert m["files"] == {"data.h5": os.path.getsize(tmp_path / "s" / "data.h5")}
    assert m["bytes"] == sum(m["files"].values())
    assert m["lossy"] is False and m["convert_time_s"] >= 0
    assert store.manifest.identity == m["identity"]


def test_checksums_are_sha256_of_the_stored_bytes(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "npy", tmp_path / "s", "float32")
    images, labels = rgb_source.split("train")
    import hashlib

    stored = (images.astype(np.float32) / 255).astype("<f4")
    info = store.manifest.splits["train"]
    assert info.images_sha256 == hashlib.sha256(stored.tobytes()).hexdigest()
    assert info.labels_sha256 == hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest()


def test_block_hashes_do_not_depend_on_batch_boundaries():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 2, 2, 1), dtype=np.uint8)
    labels = np.arange(10)
    whole, parts = ContentHash(4), ContentHash(4)
    whole.update(images, labels)
    for lo, hi in [(0, 3), (3, 9), (9, 10)]:
        parts.update(images[lo:hi], labels[lo:hi])
    a, b = whole.finish(), parts.finish()
    assert a == b and len(a["block_sha256"]) == 3


def test_checksum_block_is_a_power_of_two_of_about_64_mib():
    assert checksum_block((32, 32, 3)) == 1024
    assert checksum_block((512, 512, 3)) == 64
    assert checksum_block((4096, 4096, 3)) == 1


def test_an_identical_store_is_reused_not_rewritten(tmp_path, rgb_source):
    first = loadbench.convert(rgb_source, "lmdb", tmp_path / "s")
    stamp = os.stat(tmp_path / "s" / "manifest.json").st_mtime_ns
    again = loadbench.convert(loadbench.load_source(rgb_source.spec), "lmdb", tmp_path / "s")
    assert not first.skipped and again.skipped
    assert os.stat(tmp_path / "s" / "manifest.json").st_mtime_ns == stamp


def test_a_different_store_is_not_overwritten_without_asking(tmp_path, rgb_source, gray_source):
    loadbench.convert(rgb_source, "npy", tmp_path / "s")
    with pytest.raises(
        loadbench.LoadbenchError, match="already holds a different store.*--overwrite"
    ):
        loadbench.convert(rgb_source, "npy", tmp_path / "s", "float16")
    replaced = loadbench.convert(gray_source, "npy", tmp_path / "s", overwrite=True)
    assert replaced.image_shape == (7, 5, 1)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary or old directory left behind


def test_a_folder_that_is_not_a_store_is_not_overwritten(tmp_path, rgb_source):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "thesis.tex").write_text("precious")
    with pytest.raises(loadbench.LoadbenchError, match="not a store"):
        loadbench.convert(rgb_source, "npy", tmp_path / "s")
    assert (tmp_path / "s" / "thesis.tex").read_text() == "precious"


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, rgb_source, monkeypatch):
    calls = []

    def broken_write(self, images, labels):
        calls.append(len(images))
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, images, labels)

    original = NpyWriter.write
    monkeypatch.setattr(NpyWriter, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        loadbench.convert(rgb_source, "npy", tmp_path / "s")
    assert os.listdir(tmp_path) == []
    with pytest.raises(loadbench.LoadbenchError, match="no store"):
        loadbench.open_store(tmp_path / "s")


def test_a_partial_store_of_a_dead_process_is_cleaned_up(tmp_path, rgb_source):
    stale = tmp_path / ".s.partial-999999999"
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"half")
    with pytest.raises(loadbench.LoadbenchError, match="not a loadbench store"):
        loadbench.open_store(stale)
    loadbench.convert(rgb_source, "npy", tmp_path / "s")
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_convert_many_skips_what_a_format_cannot_store(tmp_path, rgb_source):
    results = convert_many(rgb_source, "all", tmp_path, "float16")
    by_format = {r.format: r for r in results}
    assert by_format["files-jpeg"].store is None
    assert "stores uint8 only" in by_format["files-png"].note
    made = sorted(os.listdir(tmp_path))
    arrays = ("npy", "hdf5", "zarr", "lmdb", "webdataset", "tfrecord", "arrayrecord", "tensor")
    assert made == sorted(f"{f}-float16" for f in arrays)


def test_convert_many_passes_each_format_its_own_options(tmp_path, rgb_source):
    results = convert_many(rgb_source, "hdf5,zarr", tmp_path, compression="gzip", store="zip")
    hdf5, zarr = (r.store.manifest.options for r in results)
    assert hdf5["compression"] == "gzip" and "store" not in hdf5
    assert zarr["compression"] == "gzip" and zarr["store"] == "zip"
    with pytest.raises(loadbench.LoadbenchError, match="shard_size applies to none of npy, hdf5"):
        convert_many(rgb_source, "npy,hdf5", tmp_path / "x", shard_size=5)
