"""The `tf-data` peer: tf.data gives back the stored pixels (PNG and JPEG too) over many shards,
converts and augments as loadbench does, keeps to its thread budget, says when a shard is
damaged, and TensorFlow shares a process with the `tfrecord` package and triton."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import loadbench
from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.formats.pixels import to_tensor
from loadbench.peers._base import cpu_budget
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder

# Not importorskip: TensorFlow is imported by the peer only, which lets it share the process
# with the `tfrecord` package.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed"
)

BATCH = 16


def batches(store, order, workers=0, augmenter=None):
    return make_batches(
        store, "train", order, access="sample", batch_size=BATCH, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def indices_of(store, images: torch.Tensor) -> list[int]:
    """Store indices of loaded images, matched by their pixels."""
    stored, _ = store.raw("train").read_batch(np.arange(store.counts["train"]))
    lookup = {image.tobytes(): i for i, image in enumerate(stored)}
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [lookup[p.tobytes()] for p in pixels]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, rgb_source):
    """The 40 training images in shards of 7 (6 shards), once per encoding."""
    root = tmp_path_factory.mktemp("tf-data")
    return {
        encoding: loadbench.convert(
            rgb_source, "tf-data", root / encoding, encoding=encoding, shard_size=7
        )  # fmt: skip
        for encoding in ("raw", "png", "jpeg")
    }


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_every_shard_gives_back_the_stored_pixels_as_loadbench_converts_them(shards, encoding):
    store = shards[encoding]
    stored, labels = store.raw("train").read_batch(np.arange(40))
    order = EpochOrder(np.arange(40), labels, seed=1)
    order.set_epoch(3)
    got = list(batches(store, order, workers=2))
    assert [len(y) for _, y in got] == [16, 16, 8]
    images, got_labels = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    found = indices_of(store, images)  # JPEG too: decoded as the store decodes it
    assert sorted(found) == list(range(40))
    assert got_labels.tolist() == labels[found].tolist()
    # Converted in TensorFlow, bit for bit what loadbench's own loaders hand a model.
    assert torch.equal(images, to_tensor(stored[found]))


def test_the_order_is_seeded_by_seed_and_epoch_alone(shards):
    store = shards["raw"]
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=4)
    loader = batches(store, order)
    passes = {}
    for epoch in (1, 2, 1):
        order.set_epoch(epoch)
        passes.setdefault(epoch, []).append(indices_of(store, torch.cat([x for x, _ in loader])))
    assert passes[1][0] == passes[1][1] != passes[2][0]
    order.set_epoch(1)  # more threads read the same order
    assert indices_of(store, torch.cat([x for x, _ in batches(store, order, 2)])) == passes[1][0]
    in_order = EpochOrder(np.arange(40), order.labels, seed=4, shuffle=False)
    assert indices_of(store, torch.cat([x for x, _ in batches(store, in_order)])) == list(range(40))


def test_augmentation_is_loadbench_s_per_sample_augmentation(shards):
    store = shards["raw"]
    stored = store.raw("train").read_batch(np.arange(40))[0]
    augmenter = Augmenter(build_augment(["crop", "flip"], store.image_shape), None, seed=3)
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    order.set_epoch(2)
    plain = torch.cat([x for x, _ in batches(store, order)])
    augmented = torch.cat([x for x, _ in batches(store, order, augmenter=augmenter)])
    for image, index in zip(augmented, indices_of(store, plain), strict=True):
        # What `Sample` does in the other streaming peers: (seed, epoch, store index).
        expected = augmenter(to_tensor(stored[index]), index, False, 2)
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_threads_are_the_runs_cpu_budget_and_close_lets_go(shards):
    store = shards["raw"]
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    loader = batches(store, order, workers=3)
    options = loader.pipeline(7).options()
    threads = cpu_budget(3)  # 3, or fewer on a machine with fewer cores
    assert options.threading.private_threadpool_size == threads
    assert options.threading.max_intra_op_parallelism == 1
    assert options.autotune.cpu_budget == threads
    first = iter(loader)
    next(first)
    loader.close()  # mid-epoch, as the training loop's first-batch checks leave it
    assert loader._running is None
    with pytest.raises(StopIteration):
        next(first)
    assert sum(len(y) for _, y in loader) == 40  # a new pass after close


def test_block_shuffle_and_balancing_are_refused(shards):
    store = shards["raw"]
    labels = store.raw("train").labels()
    with pytest.raises(LoadbenchError, match="own order; use shuffle exact"):
        batches(store, EpochOrder(np.arange(40), labels, seed=0, shuffle="block"))
    with pytest.raises(LoadbenchError, match="cannot draw balance=weighted"):
        batches(store, EpochOrder(np.arange(40), labels, seed=0, balance="weighted"))


def test_a_damaged_record_is_a_damaged_store(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "tf-data", tmp_path / "s")
    (shard,) = store.manifest.splits["train"].model_extra["shards"]
    path = tmp_path / "s" / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a record's pixels: its CRC no longer matches
    path.write_bytes(bytes(data))
    order = EpochOrder(np.arange(40), np.zeros(40, dtype=np.int64), seed=0, shuffle=False)
    with pytest.raises(CorruptStoreError, match="damaged: a train shard: corrupted record at"):
        list(batches(loadbench.open_store(store.path), order))


CHILD = """
import sys

import numpy as np

import loadbench
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder

source, out = loadbench.load_source(sys.argv[1]), sys.argv[2]
loadbench.convert(source, "tfrecord", out + "/tfrecord")  # the tfrecord package's own protos
store = loadbench.convert(source, "tf-data", out + "/tf-data")
order = EpochOrder(np.arange(store.counts["train"]), store.raw("train").labels(), seed=0)
loader = make_batches(store, "train", order, access="sample", batch_size=8, workers=0,
                      pin_memory=False, device="cpu", augmenter=None)
print(sum(len(y) for _, y in loader))  # TensorFlow imported after the tfrecord package
import torch._dynamo  # imports triton, which crashes when loaded after TensorFlow
print(store.raw("train").read_batch([0])[1][0])
"""


def test_tensorflow_shares_a_process_quietly_with_tfrecord_and_triton(tmp_path, rgb_source):
    spec = "synthetic:cifar-like?count=20&eval_count=4&size=8&classes=2"
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), spec, str(tmp_path / "child")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[0] == "20"
    assert "oneDNN" not in child.stderr and "absl::InitializeLog" not in child.stderr
    # Here TensorFlow may come first: the tfrecord format still writes the same records (the
    # same sizes at the same offsets; protobuf writes an Example's features in an order of its
    # own, which differs from process to process with the tfrecord package alone too).
    from loadbench.peers.tf_data import _import_tensorflow

    _import_tensorflow()
    here = loadbench.convert(spec, "tfrecord", tmp_path / "here")
    images, labels = here.raw("train").read_batch(np.arange(20))
    for kind in ("tfrecord", "tf-data"):
        theirs = loadbench.open_store(tmp_path / "child" / kind)
        assert theirs.manifest.files == here.manifest.files
        got, got_labels = theirs.raw("train").read_batch(np.arange(20))
        np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(got_labels, labels)
