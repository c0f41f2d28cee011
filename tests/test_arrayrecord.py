"""The `arrayrecord` format: ArrayRecord shards of the documented records, its options, and
damaged shards said as a damaged store (the generic format tests run over it as well)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import loadbench
from loadbench.errors import CorruptStoreError
from loadbench.formats import get_format, to_stored
from loadbench.verify import verify_path, verify_store


def test_shards_are_array_record_files_of_the_documented_records(tmp_path, rgb_source):
    import crc32c
    from array_record.python.array_record_module import ArrayRecordReader

    store = loadbench.convert(rgb_source, "arrayrecord", tmp_path / "s", shard_size=16)
    shards = store.manifest.splits["train"].model_extra["shards"]
    assert shards == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    images, labels = rgb_source.split("train")
    records = []
    for name in shards:  # read by the array_record package alone, as a Grain user would
        reader = ArrayRecordReader(str(tmp_path / "s" / name))
        assert "group_size:1," in reader.writer_options_string()  # what Grain asks for
        records += reader.read_all()
        reader.close()
    assert len(records) == 40
    for record, image, label in zip(records, images, labels, strict=True):
        magic, crc, got_label = struct.unpack_from("<4sIq", record)
        assert magic == b"LBAR" and crc == crc32c.crc32c(record[8:]) and got_label == label
        assert record[16:] == image.tobytes()  # raw pixels, H, W, C
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "train-labels.npy"), labels)


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        ("uint8", {"encoding": "png", "shard_size": 7}),
        ("uint8", {"encoding": "jpeg", "compression": "none"}),
        ("float16", {"compression": "none", "shard_size": 9}),
    ],
)
def test_encodings_and_compression_round_trip(tmp_path, rgb_source, dtype, options):
    store = loadbench.convert(rgb_source, "arrayrecord", tmp_path / "s", dtype, **options)
    images, labels = rgb_source.split("train")
    order = np.random.default_rng(0).permutation(40)
    got, got_labels = store.raw("train").read_batch(order)
    np.testing.assert_array_equal(got_labels, labels[order])
    if options.get("encoding") == "jpeg":
        assert store.manifest.lossy
    else:
        np.testing.assert_array_equal(got, to_stored(images[order], dtype))
    assert all(check.passed for check in verify_store(store, rgb_source, psnr_threshold_db=20))


def test_a_store_on_object_storage_is_read_through_a_local_copy():
    # array_record opens real files itself (riegeli), never a Python file object.
    assert get_format("arrayrecord").needs_local_file({})


def _store_with_image_5_flipped(tmp_path, source):
    store = loadbench.convert(source, "arrayrecord", tmp_path / "s", compression="none")
    (shard,) = store.manifest.splits["train"].model_extra["shards"]
    path = tmp_path / "s" / shard
    data = bytearray(path.read_bytes())
    at = data.find(source.split("train")[0][5].tobytes())  # uncompressed: its pixels are there
    assert at > 0
    data[at + 7] ^= 0xFF  # same size: opening the store cannot tell
    path.write_bytes(bytes(data))
    return tmp_path / "s", shard


def test_a_flipped_byte_in_a_record_is_a_damaged_store(tmp_path, rgb_source):
    root, shard = _store_with_image_5_flipped(tmp_path, rgb_source)
    reader = loadbench.open_store(root).raw("train")
    reader.read_batch([0, 4, 6])  # the other records still read
    with pytest.raises(CorruptStoreError, match=rf"is damaged: {shard}: .*hash mismatch"):
        reader.read_batch(np.arange(40))
    train, test = verify_path(root, rgb_source.spec)
    assert test.passed and not train.passed and shard in train.problems[0]
    done = subprocess.run([sys.executable, "-m", "loadbench", "verify", str(root)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stdout + done.stderr


def test_a_truncated_shard_is_a_damaged_store(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "arrayrecord", tmp_path / "s", shard_size=30)
    name = "train-00000-of-00002.array_record"
    path = tmp_path / "s" / name
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CorruptStoreError, match=rf"{name} is \d+ bytes, the manifest says"):
        loadbench.open_store(tmp_path / "s")
    # With the manifest agreeing, the reader itself meets the truncated file.
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["files"][name] = os.path.getsize(path)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    reader = loadbench.open_store(tmp_path / "s").raw("train")
    assert reader.read_batch([35])[1].tolist() == [rgb_source.labels("train")[35]]  # shard 2
    with pytest.raises(CorruptStoreError, match=rf"store .* is damaged: {name}: "):
        reader.read_batch([3])
    (train, test) = verify_path(tmp_path / "s")
    assert not train.passed and test.passed


def test_a_damaged_label_list_fails_verify(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "arrayrecord", tmp_path / "s")
    labels = np.load(tmp_path / "s" / "test-labels.npy")
    labels[3] = (labels[3] + 1) % 4
    np.save(tmp_path / "s" / "test-labels.npy", labels)  # same size, same header
    train, test = verify_path(tmp_path / "s")
    assert train.passed and not test.passed
    assert "list of labels differs from its images' labels (image 3)" in test.problems[-1]


def test_a_record_is_checked_by_its_own_crc_too(tmp_path, rgb_source):
    reader = loadbench.convert(rgb_source, "arrayrecord", tmp_path / "s").raw("test")
    record = reader.read_records(0, [2])[0]
    image, label = reader.decode(record, 0)
    np.testing.assert_array_equal(image, reader.read(2)[0])
    relabelled = record[:8] + struct.pack("<q", label + 1) + record[16:]
    with pytest.raises(CorruptStoreError, match="is damaged: test-00000-of-00001.array_record: "
                       "CRC mismatch"):  # fmt: skip
        reader.decode(relabelled, 0)
    with pytest.raises(CorruptStoreError, match="without the LBAR header"):
        reader.decode(b"TFRC" + record[4:], 0)
