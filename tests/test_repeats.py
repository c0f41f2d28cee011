"""Repeats: a fixed count or adaptive ({min, max, ci_pct}), the stopping rule, repeats.json, the
run keys they share, and the dry run's estimate of an experiment's wall time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from loadbench.bench.estimate import estimate
from loadbench.bench.experiment import AdaptiveRepeats, Experiment, load_experiment
from loadbench.bench.matrix import expand, plan_runs, run_key
from loadbench.bench.records import RunRecord, read_runs
from loadbench.bench.repeats import REPEATS_FILE, RepeatPlan, steady_epoch_s, stop_reason
from loadbench.bench.runner import run_experiment
from loadbench.errors import LoadbenchError

TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"
BASE = {"name": "t", "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy"],
        "epochs": 1, "repeats": 1, "batch_size": 32, "train": {"widths": "4,8"}}  # fmt: skip
RULE = AdaptiveRepeats(min=3, max=10, ci_pct=2)


def write(tmp_path, name: str = "exp.yaml", **overrides) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**BASE, **overrides}))
    return str(path)


def bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadbench", "bench", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


# -- the experiment's repeats -------------------------------------------------------------------


def test_repeats_are_a_count_or_a_rule(tmp_path):
    fixed = load_experiment(write(tmp_path, repeats=4))
    assert fixed.repeats == 4 and fixed.adaptive is None and fixed.repeat_range() == (4, 4)
    adaptive = load_experiment(write(tmp_path, repeats={"min": 2, "max": 5, "ci_pct": 1.5}))
    assert adaptive.adaptive == AdaptiveRepeats(min=2, max=5, ci_pct=1.5)
    assert adaptive.repeat_range() == (2, 5)
    assert load_experiment(write(tmp_path, repeats={})).repeat_range() == (3, 10)  # defaults


@pytest.mark.parametrize(
    "repeats,message",
    [
        ({"min": 5, "max": 3}, "repeats: min 5 is more than max 3"),
        ({"min": 1, "max": 3}, "repeats: min: .*greater than or equal to 2"),
        ({"mni": 3}, r"repeats: unknown key 'mni' \(write \{min: 3, max: 10, ci_pct: 2\}\)"),
        ({"ci_pct": 0}, "repeats: ci_pct: .*greater than 0"),
        (0, "repeats: 0 is not a number of repeats"),
        ("ten", "repeats: 'ten' is not a number of repeats"),
    ],
)
def test_bad_repeats_are_one_clear_error(tmp_path, repeats, message):
    with pytest.raises(LoadbenchError, match=message) as caught:
        load_experiment(write(tmp_path, repeats=repeats))
    assert "\n" not in str(caught.value) and "; " not in str(caught.value)  # one problem


def test_adaptive_repeats_on_several_nodes_are_refused(tmp_path):
    path = write(tmp_path, repeats={"min": 2}, distributed={"nproc_per_node": 1, "nnodes": 2})
    with pytest.raises(LoadbenchError, match="adaptive repeats .* nnodes > 1"):
        load_experiment(path)


# -- the stopping rule ----------------------------------------------------------------------


def test_low_noise_stops_at_min():
    times = [1.000, 1.004, 1.002]  # within 0.4%
    assert stop_reason(times[:2], 2, RULE) is None  # before min, however narrow
    assert stop_reason(times, 3, RULE) == "interval 0.4% <= 2%"


def test_noise_goes_on_up_to_max():
    times = [1.0, 1.3, 1.15, 1.05, 1.25, 1.1, 1.2, 1.0, 1.3, 1.15]  # spread 30%
    assert all(stop_reason(times[:n], n, RULE) is None for n in range(1, 10))
    assert re.fullmatch(r"max 10 reached \(interval 1\d\.\d% > 2%\)", stop_reason(times, 10, RULE))
    assert stop_reason([1.0], 10, RULE) == "max 10 reached (interval n/a > 2%)"


def test_the_steady_epoch_time_is_the_reports():
    from loadbench.report.data import run_row

    for epochs in ([3.0, 1.0, 2.0], [3.0, 1.0, 2.0, 9.0], [0.5], []):
        record = {"key": "k", "status": "ok", "epochs": [{"time_s": t} for t in epochs]}
        assert steady_epoch_s(record) == run_row(RunRecord.model_validate(record))["epoch_s"]


def _record(key: str, time_s: float | None, status: str = "ok") -> dict:
    epochs = [{"time_s": 9.9}, {"time_s": time_s}]  # the first epoch is left out
    return {"key": key, "status": status, "epochs": epochs, "error": "it broke\nsomewhere"}


def test_rounds_go_on_for_the_noisy_cells_only_and_stop_at_a_failure():
    exp = Experiment.model_validate({**BASE, "formats": ["npy", "lmdb", "hdf5"],
                                     "repeats": {"min": 2, "max": 4, "ci_pct": 2}})  # fmt: skip
    plan = RepeatPlan(exp, expand(exp))
    noisy = {"npy": [1.0, 1.5, 1.2, 1.3], "lmdb": [1.0, 1.001], "hdf5": [1.0, None]}
    runs = []
    for repeat in range(4):
        specs = plan.round(repeat)
        runs.append([s.cell.format for s in specs])
        records = {s.key: _record(s.key, noisy[s.cell.format][repeat]) for s in specs}
        if repeat == 1:
            (failed,) = [s for s in specs if s.cell.format == "hdf5"]
            records[failed.key]["status"] = "failed"
        plan.after_round(repeat, specs, records, done=set())
    assert runs == [["npy", "lmdb", "hdf5"]] * 2 + [["npy"]] * 2
    assert plan.round(4) == [] and plan.active == []
    cells = {label.split()[1]: c for label, c in plan.to_json()["cells"].items()}
    assert cells["npy/uint8"]["stopped"].startswith("max 4 reached (interval")
    assert cells["npy/uint8"]["repeats"] == 4 and cells["npy/uint8"]["epoch_s"] == 1.25
    assert cells["lmdb/uint8"]["stopped"] == "interval 0.1% <= 2%"
    assert cells["hdf5/uint8"]["stopped"] == "failed at repeat 2: it broke"
    assert (cells["hdf5/uint8"]["ok"], cells["hdf5/uint8"]["failed"]) == (1, 1)


def test_a_cell_whose_next_repeat_is_recorded_keeps_it():
    exp = Experiment.model_validate({**BASE, "repeats": {"min": 2, "max": 3, "ci_pct": 50}})
    plan = RepeatPlan(exp, expand(exp))
    keys = [spec.key for spec in plan_runs(exp, expand(exp))]
    for repeat in range(3):
        specs = plan.round(repeat)
        plan.after_round(repeat, specs, {k: _record(k, 1.0) for k in keys}, done=set(keys))
    (cell,) = plan.to_json()["cells"].values()
    assert cell["keys"] == keys and cell["stopped"] == "interval 0.0% <= 50%"


# -- keys: unchanged for fixed counts, shared with adaptive repeats --------------------------


# The keys loadbench gave these runs before adaptive repeats (commit 37fdef4): results
# directories of fixed-count experiments resume on them.
KEYS_BEFORE = {
    ("tiny npy/uint8 sample w0 warm", 0): "e64bca4b3648a00f",
    ("tiny npy/uint8 sample w0 cold", 0): "e5b2ee1104820928",
    ("tiny lmdb/uint8 sample w0 warm", 0): "fa56ab2ab030135d",
    ("tiny npy/uint8 sample w0 warm loader-only", 0): "dece77b3e2a42214",
    ("tiny compute-only", 0): "3a4236ac59911308",
    ("tiny npy/uint8 sample w0 warm", 1): "f1659f916da0f176",
    ("tiny lmdb/uint8 sample w0 cold", 1): "36bbd9289cbbd3d6",
    ("tiny lmdb/uint8 sample w0 warm loader-only", 1): "a1433b24ea7cac6e",
    ("tiny compute-only", 1): "0303f2b81bf3506d",
}


def test_keys_of_fixed_counts_are_unchanged_and_adaptive_repeats_share_them():
    matrix = {**BASE, "formats": ["npy", "lmdb"], "cache": "both", "ceilings": True}
    fixed = Experiment.model_validate({**matrix, "repeats": 2})
    runs = plan_runs(fixed, expand(fixed))
    keys = {(r.cell.label, r.repeat): r.key for r in runs}
    assert {k: keys[k] for k in KEYS_BEFORE} == KEYS_BEFORE
    assert all(r.key == run_key(r.settings(), r.repeat) for r in runs)
    adaptive = Experiment.model_validate({**matrix, "repeats": {"min": 2, "max": 3}})
    longer = {(r.cell.label, r.repeat): r.key for r in plan_runs(adaptive, expand(adaptive))}
    assert len(longer) == 3 * len(keys) // 2 and keys.items() <= longer.items()


# -- end to end -------------------------------------------------------------------------------


def test_adaptive_repeats_end_to_end(tmp_path):
    """min 2, max 3: a cell runs 3 repeats unless its interval is narrow after 2; a cell whose
    runs fail stops after the first; a fixed count of 3 then finds every run done."""
    bad = {"source": "cifar10:/no/such/cifar", "name": "missing"}
    path = write(tmp_path, datasets=[BASE["datasets"][0], bad], epochs=2,
                 repeats={"min": 2, "max": 3, "ci_pct": 0.001})  # fmt: skip
    results, stores = tmp_path / "results", tmp_path / "stores"
    outcome = run_experiment(load_experiment(path), results, stores)
    assert (outcome.ok, outcome.failed) == (3, 1)
    records = read_runs(results)
    assert [(r["dataset"], r["repeat"]) for r in records] == [
        ("tiny", 0), ("missing", 0), ("tiny", 1), ("tiny", 2)]  # fmt: skip
    written = json.loads((results / REPEATS_FILE).read_text())
    assert written["schema"] == 1 and written["rule"] == {"min": 2, "max": 3, "ci_pct": 0.001}
    tiny, missing = written["cells"].values()
    assert tiny["stopped"].startswith("max 3 reached (interval") and tiny["ok"] == 3
    assert tiny["keys"] == [r["key"] for r in records if r["dataset"] == "tiny"]
    assert missing["stopped"].startswith("failed at repeat 1: conversion failed")
    fixed = run_experiment(load_experiment(write(tmp_path, "fixed.yaml", epochs=2, repeats=3)),
                           results, stores)  # fmt: skip
    assert (fixed.ok, fixed.failed, fixed.skipped_done) == (0, 0, 3)
    (cell,) = json.loads((results / REPEATS_FILE).read_text())["cells"].values()
    assert cell["stopped"] == "fixed count" and cell["keys"] == tiny["keys"]


def test_the_estimate_is_within_a_factor_2_of_the_wall_time(tmp_path):
    exp = load_experiment(write(tmp_path, formats=["npy", "lmdb"], repeats=2))
    results, stores = tmp_path / "results", tmp_path / "stores"
    found = estimate(exp, str(results), str(stores))
    assert found.runs == (4, 4) and found.how == {"calibrated here": 2} and not found.unknown
    began = time.perf_counter()
    outcome = run_experiment(exp, results, stores)
    took = time.perf_counter() - began
    assert outcome.ok == 4
    assert took / 2 <= found.total_s[1] <= 2 * took, (found, took)
    again = estimate(exp, str(results), str(stores), calibrate=False)  # from the runs just done
    assert again.runs == (0, 0) and again.how == {"from their earlier runs": 2}


def test_dry_run_prints_the_runs_and_an_estimate(tmp_path):
    path = write(tmp_path, repeats={"min": 2, "max": 3, "ci_pct": 2})
    out = ["--out", tmp_path / "results", "--stores", tmp_path / "stores"]
    result = bench(path, "--dry-run", *out)
    assert result.returncode == 0, result.stderr
    assert "1 combinations x 2-3 repeats" in result.stdout
    assert "between 2 and 3 runs" in result.stdout
    assert result.stdout.count("repeat 3  (if its interval needs it)") == 1
    assert "estimate: between 2 and 3 runs left (0 done before), about" in result.stdout
    assert "calibrated here" in result.stdout
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    quiet = bench(path, "--dry-run", "--no-calibrate", *out)
    assert quiet.returncode == 0 and "estimate" not in quiet.stdout


def test_dry_run_says_what_it_cannot_calibrate(tmp_path):
    path = write(tmp_path, datasets=[{"source": "cifar10:/no/such/cifar", "name": "gone"}])
    result = bench(path, "--dry-run", "--out", tmp_path / "r", "--stores", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    assert "1 combinations x 1 repeats = 1 runs" in result.stdout
    assert "no time could be estimated" in result.stdout
    assert "not estimated: 1 combination(s): gone: cifar10: /no/such/cifar does not exist" in (
        result.stdout)  # fmt: skip
