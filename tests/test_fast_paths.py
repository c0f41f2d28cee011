"""The fast paths give exactly what the plain per-item path gives: batches, the worker ring,
the chunk cache, the block shuffle and the decoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loadbench
from conftest import valid_combinations
from loadbench.bench.experiment import Experiment
from loadbench.bench.matrix import expand, plan_runs
from loadbench.formats import codecs
from loadbench.formats.chunked import ChunkCache
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches
from loadbench.training.loaders import RingBatches
from loadbench.training.order import EpochOrder, block_order

ARRAY_FORMATS = ["npy", "hdf5", "zarr", "lmdb", "webdataset", "tfrecord", "tensor"]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, rgb_source):
    """A chunked HDF5 and a zarr of small chunks: several chunks for 40 images."""
    root = tmp_path_factory.mktemp("chunked")
    made = {}
    made["hdf5-chunked"] = loadbench.convert(
        rgb_source, "hdf5", root / "hdf5-chunked", chunk_images=8
    )
    made["zarr-small"] = loadbench.convert(rgb_source, "zarr", root / "zarr-small", chunk_images=8)
    return made


def _items(reader, indices):
    pairs = [reader.read(int(i)) for i in indices]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.parametrize("name,dtype", valid_combinations())
@pytest.mark.parametrize(
    "indices",
    [
        pytest.param(np.random.default_rng(3).permutation(40), id="permutation"),
        pytest.param(np.array([39]), id="one"),
        pytest.param(np.array([5, 5, 0, 39, 5, 12]), id="duplicates"),
        pytest.param(np.arange(32, 40), id="last-partial"),
    ],
)
def test_read_batch_equals_one_read_per_item(stores, name, dtype, indices):
    reader = stores[name, dtype].new_reader("train")
    images, labels = reader.read_batch(indices)
    expected, expected_labels = _items(stores[name, dtype].new_reader("train"), indices)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    tensor, tensor_labels = reader.read_batch_tensor(indices)
    assert tensor.is_contiguous() and tensor.dtype == torch.float32
    assert tensor_labels.tolist() == expected_labels.tolist()


def _epoch(store, access, workers, augmenter=None, batch_size=7, shuffle="exact"):
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=5, shuffle=shuffle)
    order.set_epoch(2)
    batches = make_batches(
        store, "train", order, access=access, batch_size=batch_size, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip
    got = list(batches)  # kept all at once: every batch must be memory of its own
    return got, order


@pytest.mark.parametrize("name,dtype", [("npy", "uint8"), ("zarr", "float16"), ("lmdb", "uint8"),
                                        ("hdf5", "float32"), ("files-png", "uint8")])  # fmt: skip
def test_every_access_mode_gives_the_same_batches(stores, name, dtype):
    store = stores[name, dtype]
    reference, order = _epoch(store, "sample", 0)
    indices, _ = order.draw()
    assert [len(y) for _, y in reference] == [7, 7, 7, 7, 7, 5]  # the last partial batch kept
    expected = store.read_batch("train", indices)
    torch.testing.assert_close(torch.cat([x for x, _ in reference]), expected[0], rtol=0, atol=0)
    for access, workers in [("sample", 2), ("batch", 0), ("batch", 2), ("device", 0)]:
        got, _ = _epoch(store, access, workers)
        assert len(got) == len(reference), (access, workers)
        for (x, y), (rx, ry) in zip(got, reference, strict=True):
            assert x.dtype == torch.float32 and x.is_contiguous()
            torch.testing.assert_close(x, rx, rtol=0, atol=0)
            assert y.tolist() == ry.tolist()


def test_augmented_batches_are_the_same_through_the_ring(stores):
    store = stores["npy", "uint8"]
    augment = build_augment(["flip", "crop"], store.image_shape)
    augmenter = Augmenter(augment, None, seed=1)
    reference, _ = _epoch(store, "sample", 0, augmenter)
    ring, _ = _epoch(store, "batch", 2, augmenter)
    plain, _ = _epoch(store, "sample", 0)
    assert not torch.equal(reference[0][0], plain[0][0])  # augmentation did something
    for (x, y), (rx, ry) in zip(ring, reference, strict=True):
        torch.testing.assert_close(x, rx, rtol=0, atol=0)
        assert y.tolist() == ry.tolist()


def test_the_ring_has_room_for_every_batch_in_flight(stores):
    store = stores["npy", "uint8"]
    reader = store.new_reader("train")
    keys = [(i, i, False, 0) for i in range(40)]  # (position, index, copy, epoch)
    sampler = torch.utils.data.BatchSampler(keys, 4, drop_last=False)
    batches = RingBatches(reader, sampler, batch_size=4, workers=2, pin_memory=False,
                          augmenter=None)  # fmt: skip
    assert len(batches.ring) == RingBatches.PREFETCH * 2 + 2
    assert len(batches) == 10
    # Two passes (persistent workers), every batch kept: none was overwritten by a later one.
    for _ in range(2):
        got = list(batches)
        expected = store.read_batch("train", np.arange(40))[0]
        torch.testing.assert_close(torch.cat([x for x, _ in got]), expected, rtol=0, atol=0)


def test_chunk_cache_is_bounded_and_least_recently_used_goes_first():
    cache = ChunkCache(max_bytes=3 * 100)
    loads = []

    def loader(n):
        def load():
            loads.append(n)
            return np.full(100, n, dtype=np.uint8)

        return load

    for n in [0, 1, 2, 0, 3, 1]:  # 3 evicts 1 (0 was used again); then 1 is read again
        assert cache.get(n, loader(n))[0] == n
    assert loads == [0, 1, 2, 3, 1]
    assert cache.bytes <= 300 and sorted(cache.chunks) == [0, 1, 3]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (1, 5)
    assert stats["hit_rate"] == pytest.approx(1 / 6)
    big = ChunkCache(max_bytes=50)
    assert big.get(9, loader(9))[0] == 9 and big.bytes == 0  # larger than the cache: not kept


@pytest.mark.parametrize("key", ["hdf5-chunked", "zarr-small"])
def test_chunked_reads_through_the_cache_are_exact_and_decode_each_chunk_once(chunked, key):
    store = chunked[key]
    cached = store.new_reader("train")
    indices = np.random.default_rng(0).permutation(40)
    images, labels = _items(cached, indices)
    stats = cached.cache_stats()
    assert stats["misses"] == 5 and stats["hits"] == 35  # 40 images in 5 chunks of 8
    store.chunk_cache_bytes = 0
    plain = store.new_reader("train")
    store.chunk_cache_bytes = None
    expected, expected_labels = _items(plain, indices)
    assert plain.cache_stats() is None
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    batch, _ = cached.read_batch(indices[:13])
    np.testing.assert_array_equal(batch, expected[:13])
    assert cached.block_images == 8


def test_unchunked_hdf5_has_no_cache_and_no_blocks(stores):
    reader = stores["hdf5", "uint8"].new_reader("train")
    reader.read(3)
    assert reader.cache_stats() is None and reader.block_images is None


def test_block_order_is_a_permutation_that_reads_few_chunks_at_a_time():
    rng = np.random.default_rng(0)
    indices = np.setdiff1d(np.arange(1000), rng.choice(1000, 100, replace=False))  # a subset
    positions = block_order(indices, block=50, window=2, rng=np.random.default_rng(1))
    order = indices[positions]
    assert sorted(order.tolist()) == indices.tolist()
    # Walk the order: each stretch of one window touches at most `window` chunks.
    chunks = order // 50
    seen: set[int] = set()
    windows = 0
    for chunk in chunks:
        if chunk not in seen and len(seen) == 2:
            seen, windows = set(), windows + 1
        seen.add(int(chunk))
    assert windows == 9  # 20 chunks in windows of 2
    again = indices[block_order(indices, 50, 2, np.random.default_rng(2))]
    assert not np.array_equal(order, again)


def test_order_quality_tells_exact_block_and_sorted_orders_apart():
    labels = np.arange(5000) // 500  # sorted by class, like a folder of class folders
    indices = np.arange(5000)
    exact = EpochOrder(indices, labels, seed=0, shuffle="exact").quality()
    block = EpochOrder(indices, labels, seed=0, shuffle="block", block=100, window=4).quality()
    one = EpochOrder(indices, labels, seed=0, shuffle="block", block=100, window=1).quality()
    none = EpochOrder(indices, labels, seed=0, shuffle=False).quality()
    assert exact["jump_ratio"] == pytest.approx(1.0, abs=0.05)
    assert exact["same_class"] == pytest.approx(exact["same_class_expected"], abs=0.02)
    assert exact["same_class_expected"] == pytest.approx(10 * 500 * 499 / (5000 * 4999))
    # Windows of 4 chunks of one class each: runs of a class are the price of block order.
    assert block["same_class"] > 3 * block["same_class_expected"]
    assert block["jump_ratio"] < exact["jump_ratio"]
    assert one["jump_ratio"] < 0.05 and one["same_class"] > 0.95  # chunk after chunk
    assert none["jump_ratio"] == pytest.approx(1 / (5001 / 3), rel=0.01)
    assert none["same_class"] == pytest.approx(4990 / 4999)
    with pytest.raises(loadbench.LoadbenchError, match="exact, block or none"):
        EpochOrder(indices, labels, seed=0, shuffle="sorted")


def test_block_shuffle_keeps_every_sample_once_through_a_loader(chunked):
    store = chunked["zarr-small"]
    got, order = _epoch(store, "sample", 0, shuffle="block")
    indices, _ = order.draw()
    assert sorted(indices.tolist()) == list(range(40))
    expected = store.read_batch("train", indices)[0]
    torch.testing.assert_close(torch.cat([x for x, _ in got]), expected, rtol=0, atol=0)


def test_shuffle_is_a_matrix_dimension_with_stable_keys_for_the_default():
    base = {"datasets": [{"source": "digits"}], "formats": ["zarr"], "repeats": 1}
    default = plan_runs(e := Experiment.model_validate(base), expand(e))
    both = Experiment.model_validate({**base, "shuffle": ["exact", "block"]})
    cells = expand(both)
    assert [c.shuffle for c in cells] == ["exact", "block"]
    assert "block-shuffle" in cells[1].label and "shuffle" not in cells[0].label
    runs = plan_runs(both, cells)
    assert runs[0].key == default[0].key  # exact runs keep the keys they had before
    assert "shuffle" not in runs[0].settings() and runs[1].settings()["shuffle"] == "block"
    with pytest.raises(ValueError, match="set by the matrix"):
        Experiment.model_validate({**base, "train": {"shuffle": "block"}})


@pytest.mark.parametrize("codec,channels", [("jpeg", 3), ("png", 3), ("jpeg", 1), ("png", 1)])
def test_torchvision_decoder_gives_pillows_pixels(rgb_source, codec, channels):
    images, _ = rgb_source.split("train")
    options = {"jpeg_quality": 90, "jpeg_subsampling": "4:2:0", "png_compression": 6}
    for image in images[:8]:
        image = image[:, :, :1] if channels == 1 else image
        data = codecs.encode(image, codec, options)
        fast = codecs.decode(data, channels)
        assert fast.shape == image.shape and fast.dtype == np.uint8
        np.testing.assert_array_equal(fast, codecs.decode_pil(data, channels))


def test_a_broken_image_still_raises_the_pillow_error():
    data = codecs.encode(np.zeros((8, 8, 3), np.uint8), "png", {"png_compression": 6})
    with pytest.raises((OSError, ValueError, SyntaxError)):
        codecs.decode(data[:40], 3)
    with pytest.raises((OSError, ValueError, SyntaxError)):
        codecs.decode(b"not an image", 3)


def test_block_shuffle_runs_are_recorded_and_reported_with_their_order_quality(tmp_path):
    from loadbench.bench.records import read_runs
    from loadbench.bench.runner import run_experiment
    from loadbench.report.render import write_report

    exp = Experiment.model_validate({
        "name": "order", "mode": "loader-only", "epochs": 2, "repeats": 1, "batch_size": 16,
        "datasets": [{"source": "synthetic:cifar-like?count=96&eval_count=16&size=12",
                      "name": "tiny"}],
        "formats": ["zarr", "webdataset-lib"], "format_options": {"zarr": {"chunk_images": 16}},
        "shuffle": ["exact", "block"], "shuffle_window": 2, "chunk_cache_mb": 1,
    })  # fmt: skip
    outcome = run_experiment(exp, tmp_path / "r", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (3, 0)
    assert [why for _, why in outcome.not_run] == [
        "webdataset-lib streams in its library's own order; shuffle block does not apply"
    ]
    records = read_runs(tmp_path / "r")
    peer = [r for r in records if r["format"] == "webdataset-lib"]
    assert len(peer) == 1 and peer[0]["order_quality"] is None  # not loadbench's order
    runs = {r["shuffle"]: r for r in records if r["format"] == "zarr"}
    assert runs["block"]["settings"]["shuffle_window"] == 2
    assert runs["block"]["settings"]["chunk_cache_mb"] == 1
    assert (
        runs["exact"]["order_quality"]["jump_ratio"] > runs["block"]["order_quality"]["jump_ratio"]
    )
    write_report(str(tmp_path / "r"), formats=("md",))
    text = (tmp_path / "r" / "report" / "report.md").read_text()
    assert "zarr/uint8/sample/w0/block-shuffle" in text and "order jump" in text
