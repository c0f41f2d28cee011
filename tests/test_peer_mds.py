"""The `mds` peer: MosaicML Streaming's shards, order and workers, its global state (shared
memory, filelocks, download folders) given back, damaged indexes, and stores on S3 (moto)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import loadbench
from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder
from loadbench.verify import verify_store
from test_peers import epoch_indices
from test_remote import S3, environment

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("streaming") is None, reason="streaming-community is not installed"
)

SHARD_MB = 0.002  # about 4 images of 12x12x3 a shard: 10 shards for 40 images


def batches(store, order, workers, split="train"):
    return make_batches(
        store, split, order, access="sample", batch_size=16, workers=workers,
        pin_memory=False, device="cpu", augmenter=None,
    )  # fmt: skip


def one_epoch(store, seed, epoch, workers, split="train"):
    labels = store.raw(split).labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=seed)
    order.set_epoch(epoch)
    loader = batches(store, order, workers, split)
    try:
        return epoch_indices(store, loader, split)[0]
    finally:
        loader.close()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, rgb_source):
    return loadbench.convert(rgb_source, "mds", tmp_path_factory.mktemp("mds") / "s",
                             shard_mb=SHARD_MB)  # fmt: skip


def test_many_shards_and_workers_give_each_sample_once_in_a_seeded_order(sharded):
    index = json.loads(Path(sharded.path, "train", "index.json").read_text())
    assert len(index["shards"]) >= 8
    first = one_epoch(sharded, seed=3, epoch=1, workers=2)
    assert sorted(first) == list(range(40))
    # The same order with no workers: Streaming's order does not depend on the worker count.
    assert one_epoch(sharded, seed=3, epoch=1, workers=0) == first
    assert one_epoch(sharded, seed=3, epoch=2, workers=2) != first
    assert one_epoch(sharded, seed=4, epoch=1, workers=2) != first


def test_png_jpeg_and_grayscale_read_back_what_was_written(tmp_path, rgb_source, gray_source):
    jpeg = loadbench.convert(rgb_source, "mds", tmp_path / "jpeg", encoding="jpeg")
    assert jpeg.manifest.lossy
    assert [c.problems for c in verify_store(jpeg, rgb_source)] == [[], []]
    assert sorted(one_epoch(jpeg, seed=0, epoch=1, workers=0, split="test")) == list(range(12))
    png = loadbench.convert(gray_source, "mds", tmp_path / "png", encoding="png")
    assert [c.problems for c in verify_store(png, gray_source)] == [[], []]
    order = EpochOrder(np.arange(9), png.raw("train").labels(), seed=0)
    loaded = torch.cat([x for x, _ in batches(png, order, 0)])
    assert loaded.shape == (9, 1, 7, 5)  # PIL's mode L image, given its channel back
    pixels = (loaded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = gray_source.split("train")[0]
    assert sorted(p.tobytes() for p in pixels) == sorted(i.tobytes() for i in images)
    with pytest.raises(LoadbenchError, match="shard_mb=5000"):
        loadbench.convert(rgb_source, "mds", tmp_path / "big", shard_mb=5000)


def test_repeated_opens_in_one_process_give_back_memory_and_files(sharded):
    def cycle():
        store = loadbench.open_store(sharded.path)
        store.raw("train").read_batch([5, 1])
        one_epoch(store, seed=0, epoch=1, workers=2)
        order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
        # A loader nothing holds but its iteration: its dataset must live until the end.
        assert sum(len(y) for _, y in batches(store, order, 0)) == 40
        store.close()

    cycle()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(6):
        cycle()
    # Each StreamingDataset would otherwise keep ~13 descriptors until the interpreter exits.
    assert len(os.listdir("/proc/self/fd")) <= fds + 2


def test_a_damaged_index_is_a_damaged_store(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "mds", tmp_path / "d")
    path = tmp_path / "d" / "train" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][0]["column_encodings"][0] = "pkl"  # Streaming would unpickle it
    path.write_text(json.dumps(index))
    with pytest.raises(CorruptStoreError, match="train/index.json: shard column_encodings"):
        store.raw("train").read_batch([0])


@pytest.fixture(scope="module")
def s3():
    server = S3()
    with environment(**server.env):
        yield server
    server.stop()


def test_a_store_on_s3_is_streamed_through_download_folders_of_its_own(
    s3, sharded, rgb_source, tmp_path, monkeypatch
):
    from loadbench.remote import storage_options
    from loadbench.storefiles import StoreFiles
    from loadbench.upload import upload

    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)  # set by the reader; restored after
    url = f"{s3.bucket('mds')}/sharded"
    options = storage_options(endpoint_url=s3.endpoint)
    upload(sharded.path, StoreFiles(url, options), replace=False)
    store = loadbench.open_store(url, storage_options=options, cache_dir=tmp_path / "cache")
    manifest = store.manifest

    images, labels = store.raw("train").read_batch(np.arange(40))  # its dataset stays open...
    np.testing.assert_array_equal(images, rgb_source.split("train")[0])
    np.testing.assert_array_equal(labels, rgb_source.split("train")[1])
    assert os.environ["S3_ENDPOINT_URL"] == s3.endpoint
    # ...while a loader downloads the same split into another folder: no "reused local dir".
    assert sorted(one_epoch(store, seed=1, epoch=1, workers=2)) == list(range(40))
    assert one_epoch(store, seed=1, epoch=1, workers=0) == one_epoch(sharded, 1, 1, workers=0)
    cache = tmp_path / "cache" / manifest.identity
    assert len([p for p in cache.iterdir() if p.name.startswith("mds-")]) == 1  # the reader's
    store.close()
    assert not [p for p in cache.iterdir() if p.name.startswith("mds-")]
