"""Reports from real results directories: files, self-contained HTML, numbers that match."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import yaml
from PIL import Image

from loadbench.bench.experiment import load_experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.errors import LoadbenchError
from loadbench.report.data import load_results
from loadbench.report.render import write_report

TINY = "synthetic:cifar-like?count=64&eval_count=16&size=12&classes=3"


def _experiment(tmp_path, name: str, **overrides) -> str:
    values = {
        "name": name,
        "datasets": [{"source": TINY, "name": "tiny"}, {"source": "digits?limit=40"}],
        "formats": ["npy", "files-png"],
        "dtypes": ["uint8", "float16"],
        "epochs": 2,
        "repeats": 2,
        "batch_size": 32,
        "cache": "both",
        "train": {"widths": "4,8"},
        **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    run_experiment(load_experiment(_experiment(root, "small")), root / "results", root / "stores")
    return root / "results"


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    built, written = write_report(str(results), str(out))
    return out, built, written


def test_every_file_of_the_report_is_written(report):
    out, built, written = report
    assert set(written) == {"md", "html"}
    plots = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in plots}
    for ds in ("tiny", "digits"):
        for kind in ("epoch-time", "stall", "memory", "dtypes", "curves"):
            assert f"{ds}-{kind}.png" in names
    assert "storage.png" in names
    for plot in plots:
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 200
    md = (out / "report.md").read_text()
    for plot in plots:
        assert f"](plots/{plot.name})" in md
    assert "## Findings" in md and "## Environment" in md and "## tiny" in md


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.hrefs, self.images = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.images += tag == "img"
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if "href" in attrs:
            self.hrefs.append(attrs["href"])


def test_the_html_is_self_contained(report):
    out, built, _ = report
    parser = _Links()
    parser.feed((out / "report.html").read_text())
    assert parser.images == len(list((out / "plots").glob("*.png")))
    assert parser.sources and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    assert parser.hrefs == []


def test_summary_numbers_are_the_medians_of_runs_jsonl(results, report):
    _, built, _ = report
    latest = {r["key"]: r for r in read_runs(results)}
    epochs_by_cell: dict[tuple, list[float]] = {}
    for r in latest.values():
        if r["status"] == "ok" and r["cache"] == "warm":
            steady = statistics.median(e["time_s"] for e in r["epochs"][1:])
            cell = (r["dataset"], r["format"], r["dtype"], r["access"], r["workers"])
            epochs_by_cell.setdefault(cell, []).append(steady)
    numbers = built.summary.numbers
    for dataset in ("tiny", "digits"):
        for fmt in ("npy", "files-png"):
            medians = [statistics.median(v) for (ds, f, *_), v in epochs_by_cell.items()
                       if ds == dataset and f == fmt]  # fmt: skip
            assert numbers.loc[fmt, dataset] == pytest.approx(min(medians))


def test_the_dataset_table_marks_the_fastest_and_puts_cold_beside_warm(report):
    _, built, _ = report
    table = built.sections[0].table
    assert "epoch s (cold)" in table.columns and table.rows[0][0] == "★"
    assert [row[0] for row in table.rows].count("★") == 1
    ratios = [float(row[table.columns.index("x fastest")].rstrip("x")) for row in table.rows]
    assert ratios[0] == 1.0 and ratios == sorted(ratios)
    assert "GPU %" not in table.columns  # no GPU here: the columns are left out, and said so
    assert any("No GPU" in note for note in table.notes)


def test_findings_are_computed_from_the_data(report):
    _, built, _ = report
    assert built.findings[0].startswith("How to read these")
    text = " ".join(built.findings[1:])
    assert "less disk than" in text
    # nothing is told apart from the fastest median: it is named, and said not to be a finding
    assert "apart from the fastest median" in text and "is not established" in text
    assert "had the fastest median epoch" not in text
    assert "Stored as float16" in text and "cold page cache" in text
    # 2 repeats: the exact test's smallest p is 1/3, so no timing difference is claimed and
    # every comparison says how many repeats would settle it
    assert " was faster than " not in text
    assert re.search(r"are indistinguishable with 2 repeats \(.*?\); (about \d+|more than \d+) "
                     r"repeats per configuration", text)  # fmt: skip
    assert "the tests establish a difference for none of them" in text  # float16 vs uint8
    assert "the tests establish it for none of them" in text  # cold vs warm first epoch


def test_two_results_directories_side_by_side(results, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(results, other)
    built, written = write_report(str(results), str(tmp_path / "r"), ("html",), str(other))
    assert set(written) == {"html"}
    # 2 datasets x (npy uint8, npy float16, files-png uint8): files-png holds no float16
    assert built.compare is not None and len(built.compare.rows) == 6
    assert all(row[-1] == "1.00x" for row in built.compare.rows)


def test_partial_empty_and_foreign_directories(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bench.json").write_text('{"schema": 1}')
    built, written = write_report(str(empty), str(tmp_path / "r1"))
    assert "no finished run yet" in " ".join(built.results.notes)
    with open(written["html"]) as f:
        assert "Missing" in f.read()
    old = tmp_path / "old"
    old.mkdir()
    (old / "bench.json").write_text('{"schema": 0}')
    (old / "runs.jsonl").write_text(
        json.dumps(
            {"key": "a", "status": "failed", "error": "boom", "dataset": "d", "format": "npy"}
        )
        + "\n{half a line"  # fmt: skip
    )
    built, _ = write_report(str(old), str(tmp_path / "r2"))
    notes = " ".join(built.results.notes)
    assert "schema 0" in notes and "every recorded run failed" in notes
    assert built.failed is not None and "boom" in built.failed.rows[0][1]
    with pytest.raises(LoadbenchError, match="not a results directory"):
        load_results(str(tmp_path))


def test_a_line_that_is_not_a_run_record_is_left_out_with_a_note(tmp_path):
    (tmp_path / "bench.json").write_text('{"schema": 1}')
    lines = [
        {"key": "a", "status": "failed", "error": "boom", "dataset": "d", "format": "npy"},
        {"key": "b", "status": "ok", "epochs": "not a list"},
        ["not", "a", "record"],
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = load_results(str(tmp_path))
    assert [r.key for r in results.failed] == ["a"] and len(results.runs) == 0
    assert "2 line(s) of runs.jsonl are not run records" in " ".join(results.notes)


def test_report_command(results, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "loadbench", "report", str(results), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"report (html): {tmp_path / 'r' / 'report.html'}" in done.stdout
    assert "formats x datasets" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "loadbench", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not a results directory" in bad.stderr


def test_the_html_renders_in_headless_chromium_without_console_errors(report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium when it can)")
    out, built, _ = report
    profile = out / "chromium-profile"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert built.title in done.stdout and done.stdout.count("<img") >= 10
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    assert "Failed to load resource" not in done.stderr
