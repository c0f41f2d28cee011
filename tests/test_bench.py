"""The benchmark runner: matrices, one process per run, telemetry, resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from loadbench.bench.experiment import Experiment, load_experiment
from loadbench.bench.matrix import expand, plan_runs
from loadbench.bench.pagecache import evict, resident_fraction, store_files
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.bench.telemetry import Sampler
from loadbench.errors import LoadbenchError
from loadbench.formats import format_names

TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"
# TINY has train and test splits only: each epoch evaluates (and records) the test split.
EPOCH_KEYS = {
    "epoch", "time_s", "data_wait_s", "compute_s", "images_per_s", "first_batch_s",
    "train_loss", "test_loss", "test_accuracy", "peak_rss_bytes", "mean_rss_bytes",
    "cpu_pct_mean", "cpu_pct_max", "system_cpu_pct_mean", "read_bytes", "sampler_busy_s",
    "gpu_util_pct_mean", "gpu_mem_used_bytes_max",
}  # fmt: skip


def experiment(tmp_path, **overrides) -> str:
    values = {
        "name": "t",
        "datasets": [{"source": TINY, "name": "tiny"}],
        "formats": ["npy", "lmdb"],
        "epochs": 1,
        "repeats": 1,
        "batch_size": 32,
        "train": {"widths": "4,8"},
        **overrides,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def bench(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadbench", "bench", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_an_experiment_runs_end_to_end_and_resumes(tmp_path):
    exp = load_experiment(experiment(tmp_path, cache="both"))
    results = tmp_path / "results"
    outcome = run_experiment(exp, results, tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (4, 0)
    records = read_runs(results)
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    for r in records:
        assert r["status"] == "ok" and r["schema"] == 1 and r["mode"] == "train"
        assert r["format"] in ("npy", "lmdb") and r["dtype"] == "uint8"
        assert r["store"]["bytes"] > 0 and r["store"]["images"] == {"train": 96, "test": 32}
        assert len(r["epochs"]) == 1 and set(r["epochs"][0]) >= EPOCH_KEYS
        epoch = r["epochs"][0]
        assert epoch["time_s"] > 0 and epoch["peak_rss_bytes"] > 50e6
        assert r["total_time_s"] >= epoch["time_s"] and r["time_to_first_batch_s"] > 0
        assert 0 <= r["final"]["accuracy"] <= 1 and r["final"]["split"] == "test"
        assert r["sampler"]["busy_s"] >= 0 and r["settings"]["train"] == {"widths": "4,8"}
    cold = [r for r in records if r["cache"] == "cold"]
    assert len(cold) == 2 and all(r["eviction"]["files"] > 0 for r in cold)
    assert all(
        r["eviction"]["resident_after"] in (None, 0.0) or r["eviction"]["effective"] is not None
        for r in cold
    )
    env = json.loads((results / "env.json").read_text())
    assert env["cores_logical"] >= 1 and env["torch"] == torch.__version__
    again = run_experiment(exp, results, tmp_path / "stores")
    assert (again.ok, again.skipped_done) == (0, 4)
    assert len(read_runs(results)) == 4  # nothing duplicated


def test_killing_the_runner_loses_at_most_the_run_in_progress(tmp_path):
    path = experiment(tmp_path, repeats=3, formats=["npy"])
    results, stores = tmp_path / "results", tmp_path / "stores"
    runner = subprocess.Popen(
        [sys.executable, "-m", "loadbench", "bench", path, "--out", results, "--stores", stores],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and len(read_runs(results)) < 1:
        time.sleep(0.2)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner and the run in progress, at once
    runner.wait()
    finished = read_runs(results)
    assert 1 <= len(finished) < 3
    resumed = bench(path, "--out", results, "--stores", stores)
    assert resumed.returncode == 0, resumed.stderr
    records = read_runs(results)
    assert len(records) == 3 and len({r["key"] for r in records}) == 3
    assert sorted(r["repeat"] for r in records) == [0, 1, 2]
    assert sorted(r["seed"] for r in records) == [0, 1, 2]  # a seed per repeat, recorded


def test_failures_are_recorded_and_the_matrix_goes_on(tmp_path):
    path = experiment(
        tmp_path,
        datasets=[{"source": "cifar10:/no/such/cifar"}, {"source": TINY, "name": "tiny"}],
        formats=["npy"],
    )
    result = bench(path, "--out", tmp_path / "results", "--stores", tmp_path / "stores")
    assert result.returncode == 1
    records = read_runs(tmp_path / "results")
    by_dataset = {r["dataset"]: r for r in records}
    assert by_dataset["tiny"]["status"] == "ok"
    failed = by_dataset["cifar10:cifar"]  # the label: kind and the last part of the path
    assert failed["status"] == "failed" and "/no/such/cifar does not exist" in failed["error"]
    assert "Traceback" not in result.stderr


def test_a_run_that_raises_is_recorded_with_its_error(tmp_path):
    path = experiment(tmp_path, formats=["npy"], train={"model": "resnet18", "weights": "/no.pt"})
    results = tmp_path / "results"
    outcome = run_experiment(load_experiment(path), results, tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (0, 1)
    (record,) = read_runs(results)
    assert record["status"] == "failed" and "/no.pt" in record["error"]


def test_loader_only_mode_measures_the_loader_alone(tmp_path):
    path = experiment(tmp_path, formats=["zarr"], mode="loader-only", epochs=2, access=["batch"])
    outcome = run_experiment(load_experiment(path), tmp_path / "r", tmp_path / "stores")
    assert outcome.ok == 1
    (record,) = read_runs(tmp_path / "r")
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert all(e["compute_s"] == 0 and e["images_per_s"] > 0 for e in record["epochs"])
    assert "final" not in record


def test_the_matrix_skips_what_cannot_run_and_interleaves_repeats(tmp_path):
    exp = load_experiment(experiment(
        tmp_path, formats=["files-png", "npy"], dtypes=["uint8", "float16"],
        access=["sample", "device"], workers=[0, 2], repeats=2,
    ))  # fmt: skip
    cells = expand(exp)
    reasons = {(c.format, c.dtype, c.access, c.workers): c.skip for c in cells}
    assert "stores uint8 only" in reasons["files-png", "float16", "sample", 0]
    assert "no DataLoader workers" in reasons["npy", "uint8", "device", 2]
    assert reasons["npy", "float16", "device", 0] is None
    runs = plan_runs(exp, cells)
    runnable = sum(1 for c in cells if not c.skip)
    assert len(runs) == 2 * runnable
    assert [r.repeat for r in runs] == [0] * runnable + [1] * runnable
    assert len({r.key for r in runs}) == len(runs)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"formts": ["npy"]}, "unknown key 'formts'"),
        ({"formats": ["parquet"]}, "unknown format 'parquet'"),
        ({"cache": "lukewarm"}, "cache"),
        ({"train": {"epochs": 3}}, "epochs are set by the matrix"),
        ({"train": {"lr": -1}}, "train option 'lr'"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_experiment_typos_are_one_clear_error(tmp_path, change, message):
    with pytest.raises(LoadbenchError, match=message):
        load_experiment(experiment(tmp_path, **change))


def test_a_results_directory_of_another_schema_is_refused(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench.json").write_text('{"schema": 99}')
    with pytest.raises(LoadbenchError, match="schema 99"):
        run_experiment(load_experiment(experiment(tmp_path)), results, tmp_path / "stores")


def test_the_default_experiment_is_valid_and_covers_every_format():
    exp = load_experiment(None)
    # every format but JPEG 2000, left out for time (default.yaml says why)
    assert exp.formats == [n for n in format_names() if n != "files-jp2"] and exp.repeats >= 2
    labels = {d.label for d in exp.datasets}
    assert {"digits", "cifar-like", "tinyimagenet-like", "masks-like"} <= labels


@pytest.mark.parametrize("name", ["thesis.yaml", "assignment.yaml"])
def test_shipped_experiments_are_valid(name):
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "..", "configs", name))
    assert exp.datasets and plan_runs(exp, expand(exp))


# -- telemetry and the page cache ------------------------------------------------------------------


class _Hungry(torch.utils.data.Dataset):
    """A dataset whose worker process holds 300 MB while it serves items."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        global _ballast
        _ballast = np.ones(300 * 2**20, dtype=np.uint8)
        time.sleep(0.3)
        return i


def test_the_sampler_sees_the_memory_of_dataloader_workers():
    with Sampler(0.05) as sampler:
        baseline = sampler.window()["peak_rss_bytes"]
        loader = torch.utils.data.DataLoader(_Hungry(), batch_size=1, num_workers=1)
        assert len(list(loader)) == 4
        stats = sampler.window()
    assert stats["peak_rss_bytes"] > baseline + 250 * 2**20
    assert stats["processes_max"] >= 2 and stats["samples"] >= 3


def test_eviction_drops_a_store_from_the_page_cache(tmp_path):
    data = tmp_path / "s"
    data.mkdir()
    (data / "a.bin").write_bytes(os.urandom(4 << 20))
    (data / "a.bin").read_bytes()  # now cached
    files = store_files(str(data))
    before = resident_fraction(files)
    report = evict(str(data))
    assert report["files"] == 1 and report["bytes"] == 4 << 20
    if before is None:  # no mincore on this platform: eviction still attempted
        assert report["effective"] is None
    else:
        assert report["resident_after"] <= report["resident_before"]
        assert report["effective"] == (report["resident_after"] < 0.05)


def test_experiment_model_rejects_an_empty_matrix():
    with pytest.raises(Exception, match="datasets"):
        Experiment.model_validate({"datasets": []})


@pytest.mark.parametrize("fresh", [False, True])
def test_a_run_over_its_time_limit_is_stopped_and_recorded(tmp_path, fresh):
    path = experiment(tmp_path, formats=["npy", "lmdb"], epochs=1000, timeout_s=1.5,
                      fresh_interpreter=fresh)  # fmt: skip
    outcome = run_experiment(load_experiment(path), tmp_path / "r", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (0, 2)  # the second run still ran after the first
    records = read_runs(tmp_path / "r")
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("timed out after 1.5 s" in r["error"] for r in records)
