"""The result card: card.json holds what it takes to check or reproduce a result, and two cards
say whether their rankings agree."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from importlib import metadata

import psutil
import pytest
import torch

from loadbench.bench.env import git_commit
from loadbench.bench.experiment import Experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.manifest import read_manifest
from loadbench.report.render import write_report
from loadbench.significance import median_ci

TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    experiment = Experiment.model_validate({
        "name": "card", "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy", "lmdb"],
        "epochs": 1, "repeats": 2, "batch_size": 32, "train": {"widths": "4,8"},
    })  # fmt: skip
    outcome = run_experiment(experiment, root / "results", root / "stores")
    assert (outcome.ok, outcome.failed) == (4, 0)
    return root / "results"


@pytest.fixture(scope="module")
def card(results):
    report, _ = write_report(str(results))
    assert report.card_file == str(results / "report" / "card.json")
    return strict_json(report.card_file)


def strict_json(path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def test_the_card_says_which_machine_and_software(card, results):
    machine, software = card["machine"], card["software"]
    assert card["card_schema"] == 1 and card["results"] == str(results)
    assert machine["cores_logical"] == psutil.cpu_count() and machine["ram_bytes"] > 2**20
    assert machine["cpu"] and machine["os"].startswith(platform.system())
    assert software["python"] == platform.python_version()
    assert software["torch"] == torch.__version__ and software["numpy"]
    for library in ("lmdb", "h5py", "zarr", "webdataset", "tfrecord", "pillow"):
        assert software["libraries"][library] == metadata.version(library)
    assert software["git_commit"] == git_commit() and software["loadbench"]
    assert software["git_commit"] is None or len(software["git_commit"]) == 40


def test_the_card_hashes_the_data_as_the_stores_manifests_do(card):
    dataset = card["datasets"]["tiny"]
    assert dataset["source"] == TINY and dataset["limit"] is None
    assert dataset["image_shape"] == [12, 12, 3] and dataset["images"] == {"train": 96, "test": 32}
    stores = {(s["format"], s["dtype"]) for s in dataset["stores"]}
    assert stores == {("npy", "uint8"), ("lmdb", "uint8")}
    for store in dataset["stores"]:
        manifest = read_manifest(store["path"])
        assert store["identity"] == manifest.identity and store["why_no_hashes"] is None
        for split, info in manifest.splits.items():
            assert store["splits"][split]["images_sha256"] == info.images_sha256
            assert store["splits"][split]["labels_sha256"] == info.labels_sha256
        # lossless uint8 stores hold the dataset's own pixels, whatever the format
        assert store["splits"] == dataset["content"]
    assert dataset["source_identity"]["kind"] == "synthetic"
    assert {"identity", "images_sha256", "labels_sha256", "content"} <= set(card["hashes"])


def test_the_card_says_how_it_was_measured(card, results):
    records = read_runs(results)
    protocol = card["protocol"]
    assert protocol["mode"] == "train" and protocol["epochs"] == [1]
    assert protocol["batch_size"] == [32] and protocol["device_requested"] == ["auto"]
    assert protocol["device_used"] == sorted({r["device"] for r in records})
    assert protocol["timing"] == sorted({r["epochs"][0]["timing"] for r in records})
    assert protocol["cache"] == ["warm"] and protocol["repeats_planned"] == "2"
    assert protocol["repeats_min"] == protocol["repeats_max"] == 2
    assert protocol["seed"] == 0
    seeds = sorted({(r["repeat"] + 1, r["seed"]) for r in records})
    assert [(s["repeat"], s["seed"]) for s in protocol["repeat_seeds"]] == seeds == [(1, 0), (2, 1)]
    assert card["experiment"]["name"] == "card" and "bootstrap" in card["statistic"]


def test_the_ranking_is_fastest_first_with_intervals(card, results):
    ranking = card["rankings"]["tiny"]
    assert ranking["cache"] == "warm"
    ranked = ranking["configurations"]
    assert [c["rank"] for c in ranked] == [1, 2]
    assert {c["configuration"] for c in ranked} == {"npy/uint8/sample/w0", "lmdb/uint8/sample/w0"}
    medians = [c["median_epoch_s"] for c in ranked]
    assert medians == sorted(medians)
    records = read_runs(results)
    for c in ranked:
        times = [r["epochs"][0]["time_s"] for r in records
                 if c["configuration"].startswith(r["format"] + "/")]  # fmt: skip
        assert c["repeats"] == len(times) == 2
        assert c["median_epoch_s"] == pytest.approx(statistics.median(times))
        expected = median_ci(times, seed=0)
        assert (c["ci95_low_s"], c["ci95_high_s"]) == pytest.approx(expected[1:])
        assert c["ci95_low_s"] <= c["median_epoch_s"] <= c["ci95_high_s"]


def test_the_report_pages_show_the_card(card, results):
    md = (results / "report" / "report.md").read_text()
    assert "## Result card" in md and "### Ranking: tiny (warm cache)" in md
    assert card["datasets"]["tiny"]["content"]["train"]["images_sha256"][:16] in md
    assert "Result card" in (results / "report" / "report.html").read_text()


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadbench", "report", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip


def test_a_result_compared_with_itself_agrees(card, results, tmp_path):
    done = report(results, "--compare", results, "--out", tmp_path / "r")
    assert done.returncode == 0, done.stderr
    assert "tiny: rankings agree (the same order of 2 configurations" in done.stdout
    assert f"result card: {tmp_path / 'r' / 'card.json'}" in done.stdout
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Comparison: rankings" in md and "| tiny | 2 | same | 1.00 |" in md
    assert "results/report/card.json of" in md  # B's own card, made from these records


def test_a_configuration_made_slower_changes_the_ranking(card, results, tmp_path):
    fastest, second = (c["configuration"] for c in card["rankings"]["tiny"]["configurations"])
    slower = tmp_path / "slower"
    shutil.copytree(results, slower)  # its report/card.json now describes other records
    records = read_runs(slower)
    # 3x the slowest epoch of any run: on a loaded machine a tiny epoch's time can vary 3x,
    # so 3x its own time would not surely make it the slowest
    slowest = max(e["time_s"] for r in records for e in r["epochs"])
    for r in records:
        if fastest.startswith(r["format"] + "/"):
            for epoch in r["epochs"]:
                epoch["time_s"] = 3 * slowest
    (slower / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = report(results, "--compare", slower, "--out", tmp_path / "r")
    assert done.returncode == 0, done.stderr
    assert f"tiny: rankings differ from #1 (A: {fastest}, B: {second}" in done.stdout
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"| tiny | 2 | differs from #1 | -1.00 | {fastest} | {second} |" in md
    assert "built from its records" in md


def write_results(path, times: dict[str, list[float]]) -> None:
    """A results directory of one dataset "d", a configuration per format, a run per time."""
    path.mkdir()
    (path / "bench.json").write_text('{"schema": 1}')
    lines = []
    for fmt, values in times.items():
        for repeat, time_s in enumerate(values):
            lines.append({
                "key": f"{fmt}-{repeat}", "status": "ok", "dataset": "d", "format": fmt,
                "dtype": "uint8", "access": "batch", "workers": 0, "cache": "warm",
                "mode": "train", "repeat": repeat, "seed": 7 + repeat,
                "epochs": [{"epoch": 0, "time_s": time_s, "timing": "sync"}],
            })  # fmt: skip
    (path / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_flips_beyond_the_noise_are_told_from_flips_within_it(tmp_path):
    write_results(tmp_path / "a", {"npy": [1.0, 1.01, 1.02], "lmdb": [2.0, 2.01, 2.02],
                                   "hdf5": [2.0, 2.02, 2.04], "zarr": [5.0]})  # fmt: skip
    write_results(tmp_path / "b", {"npy": [3.0, 3.03, 3.06], "lmdb": [2.01, 2.03, 2.05],
                                   "hdf5": [2.0, 2.01, 2.02], "zarr": [0.5]})  # fmt: skip
    built, _ = write_report(str(tmp_path / "a"), str(tmp_path / "r"), ("md",), str(tmp_path / "b"))
    card = strict_json(built.card_file)
    zarr = card["rankings"]["d"]["configurations"][-1]
    assert zarr["repeats"] == 1 and zarr["ci95_low_s"] is None and zarr["ci95_high_s"] is None
    assert "env.json is missing" in " ".join(card["notes"])
    assert card["datasets"]["d"]["stores"][0]["why_no_hashes"] == "the runs recorded no store"
    assert [s["seed"] for s in card["protocol"]["repeat_seeds"]] == [7, 8, 9]
    (verdict,) = built.verdicts
    npy, lmdb, hdf5 = "npy/uint8/batch/w0", "lmdb/uint8/batch/w0", "hdf5/uint8/batch/w0"
    assert verdict.startswith(f"d: rankings differ from #1 (A: {npy}, B: zarr/uint8/batch/w0")
    real = f"a real disagreement, intervals apart in both: {npy} vs {lmdb}; {npy} vs {hdf5}"
    assert f"{real}; 4 more flip(s) within noise" in verdict
    row = built.rankings.rows[0]
    assert row[-2] == f"{npy} vs {lmdb}; {npy} vs {hdf5}" and f"{lmdb} vs {hdf5}" in row[-1]
