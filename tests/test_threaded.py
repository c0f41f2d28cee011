"""`threads` access: the batches of the other access modes, made by threads of this process,
which end with the epoch, with `close`, on an error and on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch

import loadbench
from loadbench import stages
from loadbench.bench.experiment import load_experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.errors import CorruptStoreError
from loadbench.store import ArrayReader
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder
from loadbench.training.threaded import ThreadedBatches
from test_bench import experiment

FORMATS = ("npy", "files-jpeg", "files-png", "lmdb")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    source = loadbench.load_source("synthetic:cifar-like?count=70&eval_count=4&size=12")
    root = tmp_path_factory.mktemp("threaded")
    return {name: loadbench.convert(source, name, root / name) for name in FORMATS}


def _loader(store, access, workers, augmenter=None, batch_size=16, epoch=2):
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=3)
    order.set_epoch(epoch)
    return make_batches(
        store, "train", order, access=access, batch_size=batch_size, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def _epoch(store, access, workers, augmenter=None):
    batches = _loader(store, access, workers, augmenter)
    try:
        return list(batches)  # kept all at once: every batch must be memory of its own
    finally:
        shutdown(batches)


def _running() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("loadbench-threads")]


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("name", FORMATS)
def test_threads_give_the_batches_of_sample_access(made, name, augment, monkeypatch):
    store = made[name]
    monkeypatch.setattr(ThreadedBatches, "PIECE_BYTES", 5 * 12 * 12 * 3)  # pieces of 5 images
    augmenter = (
        Augmenter(build_augment(["flip", "crop"], store.image_shape), None, seed=1)
        if augment
        else None
    )
    reference = _epoch(store, "sample", 0, augmenter)
    assert [len(y) for _, y in reference] == [16, 16, 16, 16, 6]
    for workers in (0, 2):  # one thread, two threads
        got = _epoch(store, "threads", workers, augmenter)
        assert len(got) == len(reference)
        for (x, y), (rx, ry) in zip(got, reference, strict=True):
            assert x.dtype == torch.float32 and x.is_contiguous()
            torch.testing.assert_close(x, rx, rtol=0, atol=0)
            assert y.dtype == torch.int64 and y.tolist() == ry.tolist()
    assert _running() == []


def test_threads_end_with_the_epoch_with_close_and_when_left_early(made):
    batches = _loader(made["files-jpeg"], "threads", 2, batch_size=4)
    assert isinstance(batches, ThreadedBatches) and len(batches) == 18
    assert sum(len(y) for _, y in batches) == 70 and _running() == []
    for _ in batches:  # left after one batch: the rest is not made
        break
    batches.close()
    assert _running() == []
    first = next(iter(batches))
    shutdown(batches)
    assert _running() == [] and len(first[1]) == 4


def test_an_error_in_a_thread_is_the_error_the_other_modes_raise(made, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(made["files-png"].path, root)
    store = loadbench.open_store(root)
    reader = store.raw("train")
    label = int(reader.labels()[5])
    with open(reader.path(5, label), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not a png")
    errors = []
    for access in ("batch", "threads"):
        with pytest.raises(CorruptStoreError) as caught:
            _epoch(store, access, 2 if access == "threads" else 0)
        errors.append(re.sub(r"0x[0-9a-f]+", "", str(caught.value)))  # Pillow names an object
    assert errors[0] == errors[1] and "cannot decode" in errors[1]
    assert _running() == []


class _SlowReader(ArrayReader):
    """Images that take 50 ms a piece of a batch to read."""

    def read_batch_into(self, indices, out):
        time.sleep(0.05)
        return super().read_batch_into(indices, out)


def test_ctrl_c_ends_an_epoch_promptly_and_leaves_no_thread():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain script
    images = np.zeros((400, 4, 4, 3), dtype=np.uint8)
    reader = _SlowReader(images, np.zeros(400, dtype=np.int64), "train")
    keys = [(i, i, False, 1) for i in range(400)]
    batches = ThreadedBatches(
        reader, torch.utils.data.BatchSampler(keys, 200, drop_last=False), batch_size=200,
        threads=2, pin_memory=False, augmenter=None,
    )  # fmt: skip
    batches.PIECE_BYTES = 50 * images[0].nbytes  # pieces of 50 images
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    started = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in batches:  # a batch takes 4 pieces x 50 ms: the signal comes first
            time.sleep(10)
    timer.join()
    signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - started < 2 and _running() == []


def test_each_thread_counts_its_batches_in_a_row_of_its_own(made):
    batches = _loader(made["files-jpeg"], "threads", 2)
    before = batches.stages.snapshot()
    window_start = batches.stages.table.clone()
    assert sum(len(y) for _, y in batches) == 70
    counts = batches.stages.since(before)
    rows = (batches.stages.table - window_start)[:, stages.ITEMS].tolist()
    shutdown(batches)
    assert counts["items"] == 70 and counts["decode_s"] > 0 and counts["read_s"] > 0
    assert counts["collate_s"] > 0 and counts["augment_s"] == 0
    assert rows[0] == 0 and rows[1] > 0 and rows[2] > 0 and sum(rows) == 70


def test_peers_refuse_threads_and_a_bench_runs_them(tmp_path):
    path = experiment(tmp_path, formats=["npy", "webdataset-lib"], mode="loader-only",
                      access=["threads"], workers=[2])  # fmt: skip
    outcome = run_experiment(load_experiment(path), tmp_path / "r", tmp_path / "stores")
    assert outcome.ok == 1
    assert [why for _, why in outcome.not_run] == [
        "webdataset-lib runs its own pipeline with sample access only"
    ]
    (run,) = read_runs(tmp_path / "r")
    assert (run["access"], run["workers"]) == ("threads", 2)
    assert run["epochs"][0]["stages"]["items"] == 96
