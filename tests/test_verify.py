"""verify finds every kind of damage and every mismatch with the source."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import loadbench
from loadbench.errors import CorruptStoreError
from loadbench.verify import verify_path


def _flip_byte(path, offset_from_end):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_clean_store_passes_with_and_without_source(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "zarr", tmp_path / "s", "float32", compression="blosc-zstd")
    alone = verify_path(tmp_path / "s")
    assert [c.passed for c in alone] == [True, True] and not alone[0].compared
    against = verify_path(tmp_path / "s", rgb_source.spec)
    assert [(c.split, c.exact_images) for c in against] == [("train", 40), ("test", 12)]


def test_a_flipped_byte_is_found_and_located(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "npy", tmp_path / "s")
    _flip_byte(tmp_path / "s" / "test_images.npy", 5)  # same size: open_store cannot tell
    checks = verify_path(tmp_path / "s", rgb_source.spec)
    train, test = checks
    assert train.passed
    assert not test.passed and not test.checksum_ok
    assert test.bad_blocks == [(0, 12)]
    assert "differ from the manifest's checksum" in test.problems[0]
    assert "image 11 differs from the source" in test.problems[1]


def test_a_truncated_file_is_refused_on_open(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "hdf5", tmp_path / "s")
    path = tmp_path / "s" / "data.h5"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CorruptStoreError, match=r"data.h5 is \d+ bytes, the manifest says"):
        loadbench.open_store(tmp_path / "s")
    (failed,) = verify_path(tmp_path / "s")
    assert not failed.passed and "damaged" in failed.problems[0]


@pytest.mark.parametrize("name", ["lmdb", "webdataset", "tfrecord", "zarr"])
def test_damage_inside_records_and_chunks_is_caught(tmp_path, rgb_source, name):
    options = {"compression": "zstd"} if name == "zarr" else {}
    store = loadbench.convert(rgb_source, name, tmp_path / "s", **options)
    if name in ("webdataset", "tfrecord"):  # hit image 5's bytes, not tar padding
        entry = np.load(tmp_path / "s" / "train-index.npy")[5]
        target = (
            tmp_path / "s" / store.manifest.splits["train"].model_extra["shards"][entry["shard"]]
        )
        from_end = os.path.getsize(target) - int(entry["offset"]) - int(entry["size"]) // 2
    elif name == "lmdb":  # LMDB pages have free space: hit image 5's pixels where they lie
        target = tmp_path / "s" / "train.lmdb"
        pixels = rgb_source.split("train")[0][5].tobytes()
        from_end = os.path.getsize(target) - target.read_bytes().index(pixels) - 7
    else:
        target = tmp_path / "s" / max(store.manifest.files, key=store.manifest.files.get)
        from_end = os.path.getsize(target) // 2
    _flip_byte(target, from_end)
    checks = verify_path(tmp_path / "s")
    assert not all(c.passed for c in checks)
    assert any("damaged" in p or "checksum" in p for c in checks for p in c.problems)


def test_a_missing_image_file_is_named(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "files-png", tmp_path / "s")
    victim = store.raw("train").path(3, int(rgb_source.labels("train")[3]))
    os.remove(victim)
    (train, test) = verify_path(tmp_path / "s")
    assert test.passed and not train.passed
    assert os.path.basename(victim) in train.problems[0]


def test_missing_foreign_and_future_manifests(tmp_path, rgb_source):
    with pytest.raises(loadbench.LoadbenchError, match="not a directory"):
        loadbench.open_store(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(loadbench.LoadbenchError, match="no manifest.json.*loadbench convert"):
        loadbench.open_store(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(loadbench.LoadbenchError, match="not written by loadbench"):
        loadbench.open_store(tmp_path / "foreign")
    store = loadbench.convert(rgb_source, "npy", tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "loadbench_store": 99}))
    with pytest.raises(loadbench.LoadbenchError, match="schema 99"):
        loadbench.open_store(store.path)
    (tmp_path / "s" / "manifest.json").write_text("{broken")
    with pytest.raises(CorruptStoreError, match="not readable JSON"):
        loadbench.open_store(store.path)


def test_a_folder_of_stores_is_verified_store_by_store(tmp_path, rgb_source):
    loadbench.conversion.convert_many(rgb_source, "npy,lmdb", tmp_path)
    with pytest.raises(loadbench.LoadbenchError, match="folder of 2 stores"):
        loadbench.open_store(tmp_path)
    checks = verify_path(tmp_path, rgb_source.spec)
    assert [(os.path.basename(c.store), c.split) for c in checks] == [
        ("lmdb-uint8", "train"), ("lmdb-uint8", "test"),
        ("npy-uint8", "train"), ("npy-uint8", "test"),
    ]  # fmt: skip
    assert all(c.passed for c in checks)


def test_jpeg_is_judged_by_psnr(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "files-jpeg", tmp_path / "s", jpeg_quality=5)
    strict = verify_path(tmp_path / "s", rgb_source.spec)
    assert all(c.checksum_ok for c in strict)  # the store is intact...
    assert (
        not strict[0].passed and "under the 30 dB threshold" in strict[0].problems[0]
    )  # ...but poor
    assert strict[0].psnr_db < 30 and strict[0].worst_psnr_db <= strict[0].psnr_db + 10
    lenient = verify_path(tmp_path / "s", rgb_source.spec, psnr_threshold_db=15)
    assert all(c.passed for c in lenient)


def test_a_different_source_is_reported(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "npy", tmp_path / "s")
    other = rgb_source.spec.replace("size=12", "size=12&seed=5")
    checks = verify_path(tmp_path / "s", other)
    assert not checks[0].passed and "differs from the source" in " ".join(checks[0].problems)
    fewer = verify_path(tmp_path / "s", rgb_source.spec + "&limit=4")
    assert "has 4 images, the store 40" in fewer[0].problems[0]


def test_a_source_without_options_takes_the_stores_own(tmp_path):
    source = loadbench.load_source("digits", limit=30, drop="9")
    loadbench.convert(source, "tfrecord", tmp_path / "s")
    checks = verify_path(tmp_path / "s", "digits")
    assert [c.count for c in checks] == [30, 30] and all(c.passed for c in checks)
    images, _ = source.split("train")
    assert np.array_equal(
        loadbench.open_store(tmp_path / "s").raw("train").read_batch(range(30))[0], images
    )
