"""How epochs are timed: overlap kept, stall and compute attributed, ceilings run once per shape.

A loader made slow (its reader sleeps per batch) and a model made slow (its forward sleeps)
show what the timing must see: with DataLoader workers the loading overlaps the steps, so an
epoch takes less than load + compute; without workers it cannot, and the stall is the load.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import loadbench
from loadbench.bench.experiment import Experiment
from loadbench.bench.matrix import expand, plan_runs
from loadbench.bench.runner import run_experiment
from loadbench.report.bounds import bound_name, bounds_table
from loadbench.report.data import load_results
from loadbench.report.plots import plot_dataset
from loadbench.training.config import TrainConfig
from loadbench.training.loop import Run
from loadbench.training.metrics import EpochMeter
from loadbench.training.timing import DeviceTotals, StepClock

LOAD_S = STEP_S = 0.03  # per batch
BATCHES = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    source = loadbench.load_source("synthetic:cifar-like?count=256&eval_count=16&size=8&classes=4")
    return loadbench.convert(source, "npy", tmp_path_factory.mktemp("timing") / "npy")


def slow_epoch(store, monkeypatch, workers: int, timing: str = "overlap") -> dict:
    """One epoch of BATCHES batches, each read in LOAD_S more and computed in STEP_S more."""
    reader_class = type(store.new_reader("train"))
    read_into = reader_class.read_batch_into  # what `batch` access reads a batch with

    def slow_read(self, indices, out):
        time.sleep(LOAD_S)
        return read_into(self, indices, out)

    monkeypatch.setattr(reader_class, "read_batch_into", slow_read)  # forked workers inherit it
    config = TrainConfig(data=store.path, model="cnn-tiny", access="batch", workers=workers,
                         batch_size=256 // BATCHES, epochs=1, device="cpu",
                         timing=timing)  # fmt: skip
    with Run(config, store, out_dir=None) as run:
        forward = run.forward

        def slow_forward(images):
            time.sleep(STEP_S)
            return forward(images)

        run.forward = slow_forward
        return run.train_epoch(1)


def test_with_workers_loading_overlaps_the_steps(store, monkeypatch):
    epoch = slow_epoch(store, monkeypatch, workers=2)
    load, compute = BATCHES * LOAD_S, epoch["compute_s"]
    assert compute >= BATCHES * STEP_S
    # the loader worked while the model did: at least half the load is hidden (without workers
    # the epoch takes load + compute, below)
    assert epoch["time_s"] < compute + 0.5 * load
    assert epoch["data_wait_s"] < 0.5 * load
    assert 0 < epoch["au"] <= 1 and epoch["timing"] == "overlap"
    assert epoch["au"] == pytest.approx(compute / epoch["time_s"])


@pytest.mark.parametrize("timing", ["overlap", "sync"])
def test_without_workers_the_stall_is_the_load(store, monkeypatch, timing):
    epoch = slow_epoch(store, monkeypatch, workers=0, timing=timing)
    load = BATCHES * LOAD_S
    assert epoch["data_wait_s"] >= load
    assert epoch["compute_s"] >= BATCHES * STEP_S
    assert epoch["time_s"] >= epoch["data_wait_s"] + epoch["compute_s"]  # nothing overlapped
    assert epoch["time_s"] < 1.3 * (epoch["data_wait_s"] + epoch["compute_s"])
    assert 0 < epoch["au"] < 1 and epoch["timing"] == timing
    assert epoch["au"] == pytest.approx(epoch["compute_s"] / epoch["time_s"])


def test_device_totals_give_the_meter_of_per_step_reads():
    torch.manual_seed(0)
    totals, meter = DeviceTotals(torch.device("cpu")), EpochMeter()
    for n in (5, 7, 3):
        logits, labels = torch.randn(n, 4), torch.randint(0, 4, (n,))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        totals.add(loss, logits, labels)
        meter.update(float(loss), logits, labels)
    assert totals.meter().totals() == meter.totals()


def test_the_cpu_clock_times_the_step_and_the_wait_apart():
    clock = StepClock(torch.device("cpu"))
    clock.waited(0.25)
    with clock.step():
        time.sleep(0.05)
    clock.finish()
    assert clock.data_wait_s == 0.25 and 0.05 <= clock.compute_s() < 0.5 and not clock.events


def test_a_config_refuses_an_unknown_timing():
    with pytest.raises(ValueError, match="timing"):
        TrainConfig(data="-", timing="lazy")


# -- ceilings ----------------------------------------------------------------------------------

TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"


def matrix(**overrides) -> Experiment:
    values = {"datasets": [{"source": TINY, "name": "tiny"}, {"source": "digits"}],
              "formats": ["npy", "lmdb"], "access": ["sample", "batch"], "workers": [0, 1],
              "ceilings": True, "repeats": 2, **overrides}  # fmt: skip
    return Experiment.model_validate(values)


def test_ceilings_add_a_loader_twin_per_configuration_and_compute_once_per_dataset():
    cells = expand(matrix())
    modes = [c.mode for c in cells]
    train = [c for c in cells if c.mode is None and c.skip is None]
    assert len(train) == 2 * 2 * 2 * 2
    assert modes.count("loader-only") == len(train)
    compute = [c for c in cells if c.mode == "compute-only"]
    assert sorted(c.dataset.label for c in compute) == ["digits", "tiny"]
    runs = plan_runs(matrix(), cells)
    assert len(runs) == 2 * (2 * len(train) + 2)
    assert len({r.key for r in runs}) == len(runs)

    # compute-only depends on the dataset, model and batch size only: the same run whatever
    # formats, access modes and worker counts sit beside it
    def compute_keys(e):
        return {r.key for r in plan_runs(e, expand(e)) if r.mode == "compute-only"}

    assert compute_keys(matrix()) == compute_keys(matrix(formats=["zarr"], workers=[2]))
    assert compute_keys(matrix()) != compute_keys(matrix(batch_size=16))


def test_ceilings_leave_the_keys_of_train_runs_alone():
    plain = {r.key for r in plan_runs(matrix(ceilings=False), expand(matrix(ceilings=False)))}
    with_ceilings = {r.key for r in plan_runs(matrix(), expand(matrix())) if r.mode == "train"}
    assert plain == with_ceilings


def test_a_compute_only_experiment_runs_once_per_dataset():
    e = matrix(mode="compute-only", ceilings=False)
    runs = plan_runs(e, expand(e))
    assert sorted(r.cell.dataset.label for r in runs) == ["digits", "digits", "tiny", "tiny"]
    assert {r.mode for r in runs} == {"compute-only"} and len({r.key for r in runs}) == 4


def test_ceilings_need_train_mode():
    with pytest.raises(ValueError, match="ceilings: true adds"):
        matrix(mode="loader-only")


def test_the_report_names_what_bounds_each_configuration(tmp_path):
    e = Experiment.model_validate({
        "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy"], "epochs": 2,
        "repeats": 1, "batch_size": 32, "ceilings": True, "train": {"widths": "4,8"},
    })  # fmt: skip
    outcome = run_experiment(e, tmp_path / "results", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (3, 0)
    results = load_results(tmp_path / "results")
    assert set(results.runs["mode"]) == {"train"}  # ceilings are kept out of the main tables
    assert sorted(results.ceilings["mode"]) == ["compute-only", "loader-only"]
    compute = results.ceilings[results.ceilings["mode"] == "compute-only"].iloc[0]
    assert compute["images_per_s"] > 0 and 0 < compute["au"] <= 1
    assert compute["timing"] == "overlap"
    table = bounds_table(results, "tiny")
    assert table is not None and len(table.rows) == 1
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["configuration"] == "npy/uint8/sample/w0"
    assert row["bound"].startswith(("data-bound: loader", "compute-bound: model"))
    assert float(row["max"]) == max(float(row["loader s"]), float(row["compute s"]))
    loader = results.ceilings[results.ceilings["mode"] == "loader-only"].iloc[0]
    assert loader["stage_read_s"] > 0 and loader["stage_collate_s"] > 0
    assert loader["stage_decode_s"] == 0  # npy decodes nothing
    plots = plot_dataset(results, "tiny", str(tmp_path / "plots"))
    assert os.path.getsize(plots["loader stages"]) > 0


def test_bounds_are_named_by_the_slower_side():
    assert bound_name(2.1, 1.0) == "data-bound: loader 2.1x slower than the model"
    assert bound_name(1.0, 3.0) == "compute-bound: model 3.0x slower than the loader"
    assert bound_name(0.0, 3.0) == "-"
