"""Stage counters: where a loader's time goes, its bytes and images, across worker processes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import loadbench
from conftest import valid_combinations
from loadbench import stages
from loadbench.bench.experiment import load_experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder
from test_bench import experiment

COUNT = 1500  # enough images that an epoch is not its fixed costs (DataLoader start, first read)
FORMATS = ("npy", "files-png", "files-jpeg")


@pytest.fixture(scope="module")
def epoch_stores(tmp_path_factory):
    source = loadbench.load_source(f"synthetic:cifar-like?count={COUNT}&eval_count=10&size=32")
    root = tmp_path_factory.mktemp("stage-stores")
    return {name: loadbench.convert(source, name, root / name) for name in FORMATS}


def stored_bytes(store) -> int:
    """What reading every train image takes from the store: its files' bytes (files-*), or
    the pixels' bytes (npy)."""
    if store.format_name == "npy":
        return COUNT * 32 * 32 * 3
    split = os.path.join(store.path, "train")
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(split)
        for name in names
        if name != "labels.npy"
    )


def epochs(store, access, workers, count=2, augmenter=None):
    """Loader-only epochs as a bench run iterates them: [(wall s, stages), ...]."""
    n = store.counts["train"]
    order = EpochOrder(np.arange(n), np.zeros(n, dtype=np.int64), seed=0)
    batches = make_batches(
        store, "train", order, access=access, batch_size=64, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip
    out = []
    try:
        for epoch in range(1, count + 1):
            order.set_epoch(epoch)
            window = stages.StageWindow(batches)
            started = time.perf_counter()
            for images, _ in batches:
                copying = time.perf_counter_ns()
                images.to("cpu")
                window.copied(time.perf_counter_ns() - copying)
            out.append((time.perf_counter() - started, window.window()["stages"]))
    finally:
        shutdown(batches)
    return out


def busy_s(counts) -> float:
    return sum(counts[k] or 0 for k in stages.STAGE_KEYS)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("access", ["sample", "batch"])
@pytest.mark.parametrize("name", FORMATS)
def test_an_epoch_counts_its_images_bytes_and_decoding(epoch_stores, name, access, workers):
    (_, counts), *_ = epochs(epoch_stores[name], access, workers, count=1)
    assert counts["items"] == COUNT
    assert counts["bytes_read"] == stored_bytes(epoch_stores[name])
    assert counts["read_s"] > 0 and counts["collate_s"] > 0 and counts["h2d_s"] > 0
    assert counts["augment_s"] == 0
    if name == "npy":
        assert counts["decode_s"] == 0
    else:
        assert counts["decode_s"] > 0


@pytest.mark.parametrize("access", ["sample", "batch"])
@pytest.mark.parametrize("name,dtype", valid_combinations())
def test_every_format_counts_its_images_and_bytes(stores, name, dtype, access):
    store = stores[name, dtype]  # conftest's: 40 train images
    (_, counts), *_ = epochs(store, access, 0, count=1)
    assert counts["items"] == 40 and counts["read_s"] + counts["collate_s"] > 0
    if counts["decode_s"] == 0:  # raw pixels: their stored bytes
        assert counts["bytes_read"] == 40 * np.prod(store.image_shape) * np.dtype(dtype).itemsize
    else:  # encoded images: the bytes decoded
        assert counts["bytes_read"] > 0


@pytest.mark.parametrize("access", ["sample", "batch"])
@pytest.mark.parametrize("name", ["files-png", "files-jpeg"])
def test_without_workers_the_stages_add_up_to_the_epoch(epoch_stores, name, access):
    _, (wall, counts) = epochs(epoch_stores[name], access, 0)  # the second epoch: warm
    assert busy_s(counts) == pytest.approx(wall, rel=0.1)


@pytest.mark.parametrize("access", ["sample", "batch"])
def test_the_stages_of_a_fast_format_hold_most_of_the_epoch(epoch_stores, access):
    # What no stage holds: torch's DataLoader's own work per batch and the sampler's per image
    # (~60 us a batch of 64: a fifth of an npy epoch at 230k images/s, 1-3% of a files-* one).
    _, (wall, counts) = epochs(epoch_stores["npy"], access, 0)
    assert 0.5 * wall < busy_s(counts) <= 1.02 * wall


@pytest.mark.parametrize("access", ["sample", "batch"])
def test_the_counts_of_two_workers_add_up(epoch_stores, access):
    order = EpochOrder(np.arange(COUNT), np.zeros(COUNT, dtype=np.int64), seed=0)
    batches = make_batches(
        epoch_stores["files-jpeg"], "train", order, access=access, batch_size=64, workers=2,
        pin_memory=False, device="cpu", augmenter=None,
    )  # fmt: skip
    try:
        order.set_epoch(1)
        assert sum(len(labels) for _, labels in batches) == COUNT
        before = batches.stages.table.clone()
        order.set_epoch(2)
        started = time.perf_counter()
        assert sum(len(labels) for _, labels in batches) == COUNT
        wall = time.perf_counter() - started
    finally:
        shutdown(batches)
    rows = batches.stages.table - before  # 0: the main process, 1 + id: a worker
    items = rows[:, stages.ITEMS].tolist()
    assert items[0] == 0 and items[1] > 0 and items[2] > 0 and sum(items) == COUNT
    worker_s = rows[1:3, : stages.H2D + 1].sum().item() / 1e9
    assert 0 < worker_s <= 2 * wall * 1.1  # each worker counts at most the epoch


@pytest.mark.parametrize("access,workers", [("sample", 0), ("batch", 0), ("sample", 2)])
def test_augmentation_is_a_stage_of_its_own(epoch_stores, access, workers):
    augmenter = Augmenter(build_augment(["flip", "crop"], (32, 32, 3)), None, seed=1)
    (_, counts), *_ = epochs(epoch_stores["npy"], access, workers, count=1, augmenter=augmenter)
    assert counts["augment_s"] > 0 and counts["items"] == COUNT


def test_counting_off_gives_loaders_no_counters(epoch_stores, monkeypatch):
    monkeypatch.setattr(stages, "ENABLED", False)
    order = EpochOrder(np.arange(COUNT), np.zeros(COUNT, dtype=np.int64), seed=0)
    batches = make_batches(
        epoch_stores["files-jpeg"], "train", order, access="sample", batch_size=64, workers=0,
        pin_memory=False, device="cpu", augmenter=None,
    )  # fmt: skip
    order.set_epoch(1)
    assert sum(len(labels) for _, labels in batches) == COUNT
    assert batches.stages is None and stages.StageWindow(batches).window() == {}


def test_a_bench_records_the_stages_of_each_epoch(tmp_path):
    path = experiment(tmp_path, formats=["files-png"], mode="loader-only", epochs=2,
                      access=["sample", "device"])  # fmt: skip
    outcome = run_experiment(load_experiment(path), tmp_path / "r", tmp_path / "stores")
    assert outcome.ok == 2
    runs = {r["access"]: r for r in read_runs(tmp_path / "r")}
    for epoch in runs["sample"]["epochs"]:
        counted = epoch["stages"]
        assert set(counted) == {*stages.STAGE_KEYS, "bytes_read", "items"}
        assert counted["items"] == 96 and counted["decode_s"] > 0 and counted["h2d_s"] > 0
    assert all("stages" not in epoch for epoch in runs["device"]["epochs"])


def test_a_training_run_records_its_train_loaders_stages(tmp_path):
    path = experiment(tmp_path, formats=["npy"], epochs=1, access=["batch"])
    outcome = run_experiment(load_experiment(path), tmp_path / "r", tmp_path / "stores")
    assert outcome.ok == 1
    ((epoch,),) = (r["epochs"] for r in read_runs(tmp_path / "r"))
    assert epoch["stages"]["items"] == 96  # the train split's, not the evaluation's
    assert epoch["stages"]["h2d_s"] is None  # the training loop does not time its copies
