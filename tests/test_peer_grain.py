"""The `grain` peer: Grain over the `arrayrecord` shards, in loadbench's exact epoch order, one
Grain iterator from epoch to epoch, its CPU budget, and its worker processes stopped on close
(the generic peer tests in test_peers.py run over it as well)."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import torch

import loadbench
from loadbench.errors import CorruptStoreError
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder

BATCH = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory, rgb_source):
    root = tmp_path_factory.mktemp("grain")
    return {
        name: loadbench.convert(rgb_source, name, root / name)
        for name in ("npy", "arrayrecord", "grain")
    }


def batches(store, order, workers, augmenter=None):
    return make_batches(
        store, "train", order, access="sample", batch_size=BATCH, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (a, la), (b, lb) in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and la.dtype == torch.int64
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_grain_reads_the_arrayrecord_formats_bytes(stores):
    ours, theirs = stores["arrayrecord"].path, stores["grain"].path
    files = stores["arrayrecord"].manifest.files
    assert files == stores["grain"].manifest.files
    for rel in files:
        with open(f"{ours}/{rel}", "rb") as a, open(f"{theirs}/{rel}", "rb") as b:
            assert a.read() == b.read(), rel


def test_grain_gives_loadbench_batches_augmentation_and_balance_included(stores):
    npy, grain = stores["npy"], stores["grain"]
    labels = npy.raw("train").labels()
    augmenter = Augmenter(build_augment(["crop", "flip"], npy.image_shape), None, seed=3)
    order = EpochOrder(np.arange(40), labels, seed=2, balance="oversample")
    loader = batches(grain, order, 2, augmenter)  # augmented in Grain's worker processes
    try:
        for epoch in (4, 5):  # the second epoch comes from the same Grain iterator
            order.set_epoch(epoch)
            assert_same_batches(list(loader), list(batches(npy, order, 0, augmenter)))
    finally:
        shutdown(loader)


def test_the_stream_follows_unfinished_passes_and_epoch_jumps(stores):
    npy, grain = stores["npy"], stores["grain"]
    order = EpochOrder(np.arange(40), npy.raw("train").labels(), seed=0)
    loader = batches(grain, order, 0)
    for epoch, cut in ((1, False), (2, True), (2, False), (7, False)):
        order.set_epoch(epoch)
        if cut:  # a pass left after one batch: the next one starts the epoch afresh
            next(iter(loader))
            continue
        assert_same_batches(list(loader), list(batches(npy, order, 0)))
    shutdown(loader)


def _grain_workers() -> list[psutil.Process]:
    return [
        p for p in psutil.Process().children(recursive=True)
        if p.is_running() and "resource_tracker" not in " ".join(p.cmdline())
    ]  # fmt: skip


def test_close_stops_grains_worker_processes(stores):
    order = EpochOrder(np.arange(40), stores["grain"].raw("train").labels(), seed=0)
    before = len(_grain_workers())
    loader = batches(stores["grain"], order, 2)
    assert sum(len(y) for _, y in loader) == 40
    assert len(_grain_workers()) == before + 2
    shutdown(loader)
    assert len(_grain_workers()) == before


def test_read_threads_and_workers_follow_the_cpu_budget(stores, monkeypatch):
    import grain

    from loadbench.peers import grain_lib

    made = []
    real_read, real_mp = grain.ReadOptions, grain.MultiprocessingOptions
    monkeypatch.setattr(grain, "ReadOptions", lambda **kw: made.append(kw) or real_read(**kw))
    monkeypatch.setattr(
        grain, "MultiprocessingOptions", lambda **kw: made.append(kw) or real_mp(**kw)
    )
    monkeypatch.setattr(grain_lib, "cpu_budget", lambda workers: max(1, workers) * 2)
    order = EpochOrder(np.arange(40), np.zeros(40, dtype=np.int64), seed=0)
    for workers in (0, 3):
        batches(stores["grain"], order, workers).dataset(0)  # built, not started
    assert made == [
        {"num_threads": 2, "prefetch_buffer_size": 2},  # in-process: the whole budget
        {"num_threads": 2, "prefetch_buffer_size": 2},  # 6 threads over 3 processes
        {"num_workers": 3},
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_record_is_a_damaged_store_in_grains_pipeline(tmp_path, rgb_source, workers):
    store = loadbench.convert(rgb_source, "grain", tmp_path / "g", compression="none")
    (shard,) = store.manifest.splits["train"].model_extra["shards"]
    path = tmp_path / "g" / shard
    data = bytearray(path.read_bytes())
    data[data.find(rgb_source.split("train")[0][9].tobytes()) + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    store = loadbench.open_store(tmp_path / "g")
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    loader = batches(store, order, workers)
    try:
        with pytest.raises(CorruptStoreError, match=rf"is damaged: {shard}: "):
            list(loader)
    finally:
        shutdown(loader)
    with pytest.raises(CorruptStoreError, match="is damaged: the train shards: "):
        store.raw("train").read_batch(np.arange(40))  # through Grain's ArrayRecordDataSource
