"""The `ffcv` peer: FFCV's own order and epochs, JPEG stores, grayscale as three channels, and
.beton files whose tables would send FFCV's compiled loader out of bounds refused first. The
tests every peer passes are in test_peers.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="the ffcv peer needs ffcv (pip install ffcv)")

import loadbench  # noqa: E402
from conftest import psnr  # noqa: E402
from loadbench.errors import CorruptStoreError, LoadbenchError  # noqa: E402
from loadbench.peers._base import epoch_seed  # noqa: E402
from loadbench.training.batches import make_batches  # noqa: E402
from loadbench.training.order import EpochOrder  # noqa: E402
from loadbench.verify import verify_store  # noqa: E402

BATCH = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory, rgb_source):
    return loadbench.convert(rgb_source, "ffcv", tmp_path_factory.mktemp("ffcv") / "s")


def loader(store, order, workers=0, split="train", augmenter=None):
    return make_batches(
        store, split, order, access="sample", batch_size=BATCH, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def labels_of(passes) -> list[int]:
    return [label for _, labels in passes for label in labels.tolist()]


def test_the_epoch_order_is_ffcvs_random_order_seeded_from_seed_and_epoch(store):
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(40), labels, seed=5)
    batches = loader(store, order, workers=2)
    for epoch in (3, 1):
        order.set_epoch(epoch)
        # FFCV's OrderOption.RANDOM: a permutation seeded with seed + epoch.
        expected = np.random.default_rng(epoch_seed(5, epoch)).permutation(40)
        assert labels_of(batches) == labels[expected].tolist()
    order.set_epoch(2)
    next(iter(batches))  # a pass cut short (the training loop's first-batch checks) ...
    expected = np.random.default_rng(epoch_seed(5, 2)).permutation(40)
    assert labels_of(batches) == labels[expected].tolist()  # ... shifts no epoch


def test_leaving_a_pass_early_stops_ffcvs_thread(store):
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    batches = loader(store, order)
    before = threading.active_count()
    passes = iter(batches)
    next(passes)
    batches.close()
    passes.close()
    for thread in threading.enumerate():
        if type(thread).__name__ == "EpochIterator":
            thread.join(timeout=5)
            assert not thread.is_alive()
    assert threading.active_count() <= before


def test_torch_keeps_its_thread_count(tmp_path, rgb_source, store):
    threads = torch.get_num_threads()
    loadbench.convert(rgb_source, "ffcv", tmp_path / "t")
    order = EpochOrder(np.arange(12), store.raw("test").labels(), seed=0)
    assert sum(len(y) for _, y in loader(store, order, workers=2, split="test")) == 12
    assert torch.get_num_threads() == threads  # importing ffcv, and its Loader, set it


def test_jpeg_stores_give_back_what_the_writer_said(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "ffcv", tmp_path / "j", encoding="jpeg")
    assert store.manifest.lossy
    images, labels = rgb_source.split("train")
    got, got_labels = store.raw("train").read_batch(np.arange(40))
    np.testing.assert_array_equal(got_labels, labels)
    assert psnr(got, images) > 20  # OpenCV's 4:2:0 JPEG, FFCV's fixed choice, on 12x12 noise
    # The store's content hash (from what the writer returned) matches what is read back.
    assert [c.problems for c in verify_store(store, rgb_source, psnr_threshold_db=20)] == [[], []]
    order = EpochOrder(np.arange(40), labels, seed=0, shuffle=False)
    loaded = torch.cat([x for x, _ in loader(store, order)])
    pixels = (loaded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, got)  # the loader decodes as the reader does


def test_grayscale_is_stored_as_three_equal_channels(tmp_path, gray_source):
    from ffcv.reader import Reader

    store = loadbench.convert(gray_source, "ffcv", tmp_path / "g")
    reader = Reader(str(tmp_path / "g" / "train.beton"))
    image = reader.metadata["f0"][0]
    pixels = np.fromfile(reader.file_name, np.uint8, 7 * 5 * 3, offset=int(image["data_ptr"]))
    pixels = pixels.reshape(7, 5, 3)
    first = gray_source.split("train")[0][0]  # 7,5,1
    np.testing.assert_array_equal(pixels, np.repeat(first, 3, axis=2))
    assert store.raw("train").read(0)[0].shape == (7, 5, 1)


def _damage(path, offset: int, value: np.ndarray) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.tobytes())


@pytest.mark.parametrize("where", ["size", "pointer", "width", "version"])
def test_a_beton_whose_tables_lie_is_refused_before_ffcv_reads_it(tmp_path, rgb_source, where):
    from ffcv.reader import Reader
    from ffcv.types import FieldDescType, HeaderType

    store = loadbench.convert(rgb_source, "ffcv", tmp_path / where)
    path = tmp_path / where / "test.beton"
    reader = Reader(str(path))
    table = int(reader.header["alloc_table_ptr"])
    metadata = HeaderType.itemsize + 3 * FieldDescType.itemsize  # image 0's metadata
    image = reader.metadata.dtype["f0"]
    # An allocation is (sample id, pointer, size); an image's metadata (mode, width, height,
    # pointer).
    if where == "size":  # FFCV's loader would copy 1 MiB into a 432-byte buffer
        _damage(path, table + 16, np.array([1 << 20], "<u8"))
    elif where == "pointer":
        _damage(path, table + 8, np.array([1 << 40], "<u8"))
        _damage(path, metadata + image.fields["data_ptr"][1], np.array([1 << 40], "<u8"))
    elif where == "width":
        _damage(path, metadata + image.fields["width"][1], np.array([4000], "<u2"))
    else:
        _damage(path, 0, np.array([3], "<u2"))
    order = EpochOrder(np.arange(12), np.zeros(12, dtype=np.int64), seed=0)
    reopened = loadbench.open_store(store.path)
    with pytest.raises(CorruptStoreError, match="test.beton"):
        loader(reopened, order, split="test")


class _FailingRows:
    def __len__(self):
        return 250

    def __getitem__(self, index):
        if index == 180:
            raise OSError("a read that fails")
        return np.zeros((4, 4, 3), np.uint8), 0, index


def test_a_failing_datasetwriter_worker_is_an_error_not_a_hang(tmp_path):
    from loadbench.peers import ffcv_lib

    fields = ffcv_lib.ffcv_fields({"encoding": "raw", "jpeg_quality": 90})
    with pytest.raises(LoadbenchError, match="DatasetWriter failed"):
        ffcv_lib._write_beton(str(tmp_path / "x.beton"), fields, _FailingRows(), 2, 2 << 20)
    assert not (tmp_path / "x.beton").exists()
