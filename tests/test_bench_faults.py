"""Faults around a results directory: a second bench, a killed one, torn lines, a full or
read-only disk, Ctrl-C during a report, a store deleted or replaced under a run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from loadbench.bench import runner
from loadbench.bench.experiment import load_experiment
from loadbench.bench.lock import LOCK, results_lock
from loadbench.bench.matrix import expand, plan_runs
from loadbench.bench.records import RUNS, RunRecord, append_run, read_runs
from loadbench.errors import LoadbenchError
from loadbench.report.data import load_results
from loadbench.report.render import write_report
from loadbench.util import now_iso

TINY = "synthetic:cifar-like?count=64&eval_count=16&size=8&classes=3"
PYTHON = [sys.executable, "-m", "loadbench"]


def experiment(tmp_path, **overrides) -> str:
    values = {"name": "t", "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy"],
              "epochs": 1, "repeats": 1, "batch_size": 32, "mode": "loader-only",
              "access": ["batch"], **overrides}  # fmt: skip
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def keys_of(path: str) -> list[str]:
    exp = load_experiment(path)
    return [spec.key for spec in plan_runs(exp, expand(exp))]


def results_dir(tmp_path, *lines: str, name: str = "results"):
    """A results directory whose runs.jsonl is `lines` as they are (no newline added)."""
    d = tmp_path / name
    d.mkdir()
    (d / "bench.json").write_text('{"schema": 1}')
    (d / RUNS).write_text("".join(lines))
    return d


def record(key: str, status: str = "failed", **more) -> str:
    data = {"schema": 1, "key": key, "status": status, "dataset": "tiny", "format": "npy",
            "error": "boom" if status == "failed" else None, **more}  # fmt: skip
    return json.dumps(data)


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*PYTHON, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "300"})  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def killed_bench_lock(directory) -> int:
    """The lock file a bench killed in `directory` left; returns its pid."""
    pid = dead_pid()
    held = {"pid": pid, "host": socket.gethostname(), "started": now_iso(), "command": "bench"}
    (directory / LOCK).write_text(json.dumps(held))
    return pid


# -- one writer per results directory ------------------------------------------------------------


def test_a_second_bench_on_the_same_results_is_refused_naming_the_holder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from loadbench.bench.lock import results_lock
            with results_lock({str(results)!r}):
                print("held", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        held = json.loads((results / LOCK).read_text())
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname()
        started = time.perf_counter()
        line = one_line_error(cli("bench", experiment(tmp_path), "--out", results))
        assert time.perf_counter() - started < 60  # refused at once, not after converting
        assert f"pid {holder.pid} on {socket.gethostname()}, started {held['started']}" in line
        assert "in use by another loadbench bench" in line
        assert not (results / RUNS).exists() and not (results / "bench.json").exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (results / LOCK).exists()  # released on exit


def test_a_lock_left_by_a_killed_bench_is_taken_over_with_a_note(tmp_path):
    lock = tmp_path / LOCK
    pid = killed_bench_lock(tmp_path)
    with results_lock(str(tmp_path)) as note:
        assert note is not None and f"pid {pid}" in note and "no longer running" in note
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    with results_lock(str(tmp_path)) as note:  # a clean directory: nothing to say
        assert note is None


def test_a_lock_whose_pid_went_to_a_newer_process_is_taken_over(tmp_path):
    # flock is free, the pid is alive, but that process started after the lock was taken.
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                             "started": "2001-01-01T00:00:00+00:00"}))  # fmt: skip
    with results_lock(str(tmp_path)) as note:
        assert "no longer running" in note


def test_where_flock_does_not_reach_the_lock_file_still_refuses(tmp_path):
    lock = tmp_path / LOCK
    alive = {"pid": os.getppid(), "host": socket.gethostname(), "started": now_iso()}
    lock.write_text(json.dumps(alive))  # a live bench of this host, on a flock-less mount
    with pytest.raises(LoadbenchError, match=f"pid {os.getppid()} on"), results_lock(tmp_path):
        pass
    lock.write_text(json.dumps({**alive, "pid": dead_pid(), "host": "elsewhere"}))
    refused = pytest.raises(LoadbenchError, match=f"another machine.*remove {lock}")
    with refused, results_lock(str(tmp_path)):
        pass
    assert lock.exists()  # never taken over, never removed


def test_a_run_recorded_ok_meanwhile_is_neither_run_nor_recorded_again(tmp_path, monkeypatch):
    # What a second writer the lock cannot see (another host, flock-less) would do: record
    # runs of this bench's list while it runs.
    path = experiment(tmp_path, formats=["npy", "lmdb"])
    exp = load_experiment(path)
    first, second = keys_of(path)
    results = tmp_path / "results"
    ran = []

    def one_run(spec, store, scratch, processes):
        ran.append(spec.key)
        for key in (first, second):
            append_run(str(results), RunRecord(key=key, status="ok"))
        return spec.record().model_copy(update={"status": "ok"})

    stores = {runner._store_key(spec.cell): {} for spec in plan_runs(exp, expand(exp))}
    monkeypatch.setattr(runner, "convert_stores", lambda *args: stores)
    monkeypatch.setattr(runner, "launcher", lambda e, p: type("L", (), {"close": lambda s: 0})())
    monkeypatch.setattr(runner, "_one_run", one_run)
    outcome = runner.run_experiment(exp, results, tmp_path / "stores")
    assert ran == [first] and (outcome.ok, outcome.skipped_done) == (0, 1)
    assert any("recorded by another process" in note for note in outcome.notes)
    assert [r["key"] for r in read_runs(results)] == [first, second]


# -- torn and unreadable lines -----------------------------------------------------------------


def test_a_torn_last_line_is_cut_and_its_run_runs_again_exactly_once(tmp_path):
    path = experiment(tmp_path)
    (key,) = keys_of(path)
    whole = record("0123456789abcdef") + "\n"
    results = results_dir(tmp_path, whole, record(key, "ok")[:40])  # a crash mid-write
    pid = killed_bench_lock(results)
    exp = load_experiment(path)
    outcome = runner.run_experiment(exp, results, tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (1, 0)
    notes = " ".join(outcome.notes)
    assert f"took over {results / LOCK}" in notes and f"pid {pid}" in notes
    assert "line 2 was cut short" in notes and "runs again" in notes
    text = (results / RUNS).read_text()
    assert text.startswith(whole) and text.endswith("\n")
    assert [(r["key"], r["status"]) for r in read_runs(results)] == [
        ("0123456789abcdef", "failed"), (key, "ok")]  # fmt: skip
    again = runner.run_experiment(exp, results, tmp_path / "stores")
    assert (again.ok, again.skipped_done, again.notes) == (0, 1, [])
    assert (results / RUNS).read_text() == text


def test_a_record_after_a_last_line_without_its_newline_starts_a_line(tmp_path):
    results = results_dir(tmp_path, record("a"))  # whole, but its newline never written
    append_run(str(results), RunRecord(key="b", status="ok"))
    assert [r["key"] for r in read_runs(results)] == ["a", "b"]


def test_a_failed_append_leaves_no_half_line(tmp_path, monkeypatch):
    results = results_dir(tmp_path, record("a") + "\n")
    before = (results / RUNS).read_bytes()
    real_write = os.write

    def disk_full(fd, data):  # half the line fits, then the disk is full
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(RUNS):
            return real_write(fd, data)
        if len(data) > 8:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(LoadbenchError, match=f"recording a run in {results / RUNS}: out of disk"):
        append_run(str(results), RunRecord(key="b", status="ok"))
    monkeypatch.undo()
    assert (results / RUNS).read_bytes() == before


def test_the_report_names_the_lines_it_leaves_out(tmp_path, capsys, monkeypatch):
    results = results_dir(
        tmp_path,
        record("a") + "\n",
        "not json at all\n",
        record("b")[:30] + record("c") + "\n",  # what earlier versions appended onto a torn line
        '["not", "a", "record"]\n',
        record("d")[:25],
    )  # fmt: skip
    loaded = load_results(str(results))
    assert sorted(r.key for r in loaded.failed) == ["a", "c"]
    note = next(n for n in loaded.notes if "line(s) of runs.jsonl" in n)
    assert note.startswith("4 line(s) of runs.jsonl are not run records and are left out: ")
    assert "line 2 (not JSON)" in note and "line 4 (not a run record)" in note
    assert "line 3 (a record cut short, then a whole record (kept)" in note
    assert "line 5 (cut short (a bench was killed while writing it" in note
    _, written = write_report(str(results), str(tmp_path / "report"))
    for page in written.values():
        with open(page) as f:
            assert "line 2 (not JSON)" in f.read()
    code, out, _ = main(monkeypatch, capsys, "report", results, "--out", tmp_path / "r2")
    assert code == 0 and "line 5 (cut short" in out.replace("\n", " ")


# -- places that cannot be written ---------------------------------------------------------------


def test_bench_out_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line_error(cli("bench", experiment(tmp_path), "--out", tmp_path / "file" / "r"))
    assert str(tmp_path / "file" / "r") in line and "under a file" in line


def test_results_on_a_read_only_file_system(tmp_path):
    """`report --out` elsewhere works; without --out one line says to pass it; `bench` there
    is one line too. A read-only bind mount in a user namespace (root ignores chmod)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    results = results_dir(ro, record("a") + "\n")
    path = experiment(tmp_path)
    loadbench = " ".join(PYTHON)
    script = f"""
        mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 77
        {loadbench} report {results} --out {tmp_path / "out"}; echo "rc=$?"
        {loadbench} report {results}; echo "rc=$?"
        {loadbench} bench {path} --out {results} --stores {tmp_path / "stores"}; echo "rc=$?"
    """
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})  # fmt: skip
    if done.returncode == 77 or shutil.which("unshare") is None:
        pytest.skip(f"no read-only bind mount here: {done.stderr[-300:]}")
    assert [line for line in done.stdout.splitlines() if line.startswith("rc=")] == [
        "rc=0", "rc=2", "rc=2"]  # fmt: skip
    assert (tmp_path / "out" / "report.md").exists() and not (results / "report").exists()
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(errors) == 2, done.stderr
    assert "read-only file system" in errors[0] and "pass --out DIR" in errors[0]
    assert "read-only file system" in errors[1] and str(results) in errors[1]


# -- Ctrl-C during a report ----------------------------------------------------------------------


def main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`loadbench ARGS` in this process: exit code, stdout, stderr."""
    from loadbench.cli import main as loadbench_main

    monkeypatch.setattr(sys, "argv", ["loadbench", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        loadbench_main()
    out, err = capsys.readouterr()
    return exit.value.code or 0, out, err


def test_ctrl_c_during_a_report_leaves_the_report_before_it_whole(tmp_path, capsys, monkeypatch):
    from loadbench.report import render

    results = results_dir(tmp_path, record("a") + "\n")
    out = tmp_path / "report"
    _, written = write_report(str(results), str(out))
    before = {name: (out / name).read_text() for name in ("report.md", "report.html", "card.json")}
    (results / RUNS).write_text(record("a") + "\n" + record("b") + "\n")

    def interrupted(report):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "to_html", interrupted)  # after the plots and report.md
    code, _, err = main(monkeypatch, capsys, "report", results, "--out", out)
    assert code == 130 and "Traceback" not in err  # (typer exits 130 silently)
    assert sorted(os.listdir(out)) == ["card.json", "report.html", "report.md"]  # no staging
    assert {name: (out / name).read_text() for name in before} == before
    # A killed report's staging folder goes with the next report.
    os.mkdir(out / f".report.partial-{dead_pid()}")
    monkeypatch.undo()
    write_report(str(results), str(out))
    assert sorted(os.listdir(out)) == ["card.json", "report.html", "report.md"]
    assert "1 failed" in before["report.md"] and "2 failed" in (out / "report.md").read_text()


def test_ctrl_c_while_held_off_is_raised_when_the_block_ends():
    import signal

    from loadbench.util import interrupts_held

    done = []
    # Python's own handler, as in a plain script (whatever an earlier test in this process left)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs its handlers between bytecodes
            done.append(True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == [True]


# -- a store deleted or replaced under a run -----------------------------------------------------


def test_a_store_deleted_or_replaced_under_a_run_fails_it(tmp_path):
    import loadbench
    from loadbench.bench.worker import check_store

    store = loadbench.convert(TINY, "npy", tmp_path / "store")
    m = store.manifest
    exp = load_experiment(experiment(tmp_path))
    (spec,) = plan_runs(exp, expand(exp))
    spec.store = {"identity": m.identity, "created": m.created}
    check_store(store, spec)  # as converted
    manifest = tmp_path / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "created": "2999-01-01T00:00:00+00:00"}))
    with pytest.raises(LoadbenchError, match=r"was replaced during the run \(converted "):
        check_store(store, spec)
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(LoadbenchError, match="was deleted or damaged during the run"):
        check_store(store, spec)


@pytest.mark.slow
def test_deleting_the_store_during_a_bench_records_the_run_failed(tmp_path):
    # zarr reads missing chunks as blank images without an error: before the manifest check
    # such a run was recorded ok.
    source = "synthetic:cifar-like?count=4000&eval_count=32&size=16&classes=3"
    path = experiment(tmp_path, datasets=[{"source": source, "name": "big"}], formats=["zarr"],
                      epochs=100_000, timeout_s=300)  # ends when the deletion is seen  # fmt: skip
    results, stores = tmp_path / "results", tmp_path / "stores"
    bench = subprocess.Popen(
        [*PYTHON, "bench", path, "--out", results, "--stores", stores],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in bench.stdout:  # the run's label is printed as it starts
        if "[1/1]" in line:
            break
    time.sleep(2)
    shutil.rmtree(next(stores.glob("*/zarr-uint8")))
    bench.communicate(timeout=300)
    (run,) = read_runs(results)
    assert run["status"] == "failed" and "was deleted or damaged during the run" in run["error"]
    assert run["store"]["created"] and run["store"]["identity"]


def test_recorded_ok_reads_only_whole_lines_appended_since_and_rereads_a_cut_file(tmp_path):
    from loadbench.bench.records import RecordedOk

    results = results_dir(tmp_path, record("a", "ok") + "\n" + record("b") + "\n")
    recorded = RecordedOk(str(results))
    assert recorded.current() == {"a"}
    with open(results / RUNS, "a") as f:
        f.write(record("c", "ok") + "\n" + record("d", "ok")[:30])  # d is being written
    assert recorded.current() == {"a", "c"}
    with open(results / RUNS, "a") as f:
        f.write(record("d", "ok")[30:] + "\n")
    assert recorded.current() == {"a", "c", "d"}
    (results / RUNS).write_text(record("e", "ok") + "\n")  # cut and written again
    assert recorded.current() == {"e"}
