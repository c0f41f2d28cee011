"""`convert --jobs N`: the store one process makes, and nothing left when a worker fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import loadbench
from conftest import fork_marks
from loadbench.conversion import convert_many, resolve_jobs
from loadbench.errors import LoadbenchError
from loadbench.formats import ALL_NAMES, get_format
from loadbench.formats.files import FilesWriter
from loadbench.formats.npy import NpyWriter
from loadbench.verify import verify_store

TIMING = ("convert_time_s", "total_time_s", "created")
# Small units, so that two workers write several ranges of every split.
UNIT_OPTIONS = {"shard_size": 8, "chunk_images": 8}
# Generated on demand (not held in memory), so one-writer formats read it in the workers.
SOURCE = "synthetic:cifar-like?count=45&eval_count=13&size=12&classes=4"


@pytest.fixture(scope="module")
def source():
    return loadbench.load_source(SOURCE)


def manifest(path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    if m["format"] == "litdata":  # its index.json holds a time (updated_at): sizes vary by a byte
        m = {**m, "files": {k: v for k, v in m["files"].items() if not k.endswith("index.json")}}
        del m["bytes"], m["bytes_allocated"]
    return {k: v for k, v in m.items() if k not in TIMING}


def convertible(name: str) -> bool:
    return get_format(name).missing() is None


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=fork_marks(n)) for n in ALL_NAMES if convertible(n)]
)
def test_two_jobs_make_the_store_one_job_makes(tmp_path, source, name):
    fmt = get_format(name)
    options = {k: v for k, v in UNIT_OPTIONS.items() if k in fmt.options}
    one = loadbench.convert(source, name, tmp_path / "one", jobs=1, **options)
    two = loadbench.convert(source, name, tmp_path / "two", jobs=2, **options)
    assert manifest(tmp_path / "two") == manifest(tmp_path / "one")
    assert all(check.passed for check in verify_store(two, source))
    for split in source.splits:  # lossy stores too: JPEG decoding is deterministic
        everything = np.arange(source.count(split))
        a, b = one.raw(split).read_batch(everything), two.raw(split).read_batch(everything)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]  # no partial, no scratch


@pytest.mark.parametrize(
    ("name", "options"),
    [("webdataset", {"encoding": "jpeg", "shard_size": 5}), ("zarr", {"compression": "zstd"})],
)
def test_encodings_and_codecs_in_parallel(tmp_path, source, name, options):
    loadbench.convert(source, name, tmp_path / "one", **options)
    loadbench.convert(source, name, tmp_path / "two", jobs=2, **options)
    assert manifest(tmp_path / "two") == manifest(tmp_path / "one")


def test_workers_read_a_source_into_memory(source):
    held = source.in_memory(jobs=2)
    assert held.decoded and not source.decoded
    for split in source.splits:
        expected, labels = source.split(split)
        got = held.split(split)
        assert np.array_equal(got[0], expected) and np.array_equal(got[1], labels)


def test_convert_many_with_jobs(tmp_path, source):
    made = convert_many(source, "files-png,npy,hdf5", tmp_path / "two", jobs=2)
    convert_many(source, "files-png,npy,hdf5", tmp_path / "one")
    assert [c.format for c in made if c.store] == ["files-png", "npy", "hdf5"]
    for c in made:
        name = os.path.basename(c.path)
        assert manifest(tmp_path / "two" / name) == manifest(tmp_path / "one" / name)


def test_a_failing_worker_fails_the_conversion_and_leaves_nothing(tmp_path, source, monkeypatch):
    write = NpyWriter.write

    def failing(self, images, labels):
        if self.pos >= 20:  # a range that a worker writes, not the first one
            raise OSError(28, "No space left on device")
        return write(self, images, labels)

    monkeypatch.setattr(NpyWriter, "write", failing)  # the forked workers inherit it
    with pytest.raises(LoadbenchError, match="failed in a worker process: OSError.*No space"):
        loadbench.convert(source, "npy", tmp_path / "s", jobs=2)
    assert os.listdir(tmp_path) == []


def test_a_killed_worker_fails_the_conversion_and_leaves_nothing(tmp_path, source, monkeypatch):
    write = FilesWriter.write

    def killed(self, images, labels):
        if self.pos >= 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, images, labels)

    monkeypatch.setattr(FilesWriter, "write", killed)
    with pytest.raises(LoadbenchError, match="killed by signal 9"):
        loadbench.convert(source, "files-png", tmp_path / "s", jobs=2)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_ends_the_workers_and_removes_the_partial_store(tmp_path):
    script = textwrap.dedent(f"""
        import signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal
        import loadbench
        from loadbench.formats.npy import NpyWriter
        write = NpyWriter.write
        def stuck(self, images, labels):
            if self.pos >= 20:
                time.sleep(60)
            return write(self, images, labels)
        NpyWriter.write = stuck
        loadbench.convert({SOURCE!r}, "npy", {str(tmp_path / "s")!r}, jobs=2)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not any(".partial-" in n for n in os.listdir(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are writing now
    workers = _children(process.pid)
    assert len(workers) == 2
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole process group
    assert process.wait(timeout=20) != 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert os.listdir(tmp_path) == []


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_jobs_zero_is_one_per_core_and_negative_is_refused():
    assert resolve_jobs(0) == os.cpu_count()
    assert resolve_jobs(3) == 3
    with pytest.raises(LoadbenchError, match="--jobs -1"):
        resolve_jobs(-1)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "loadbench", *map(str, args)],
        capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_cli_jobs(tmp_path):
    assert "--jobs" in cli("convert", "--help").stdout
    made = cli("convert", "digits", "-f", "files-png,hdf5", "-o", tmp_path, "--limit=40", "-j", 2)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "files-png-uint8" / "manifest.json").is_file()
    # digits is held in memory: hdf5's one writer has nobody to share the work with
    assert "hdf5 writes each split with one writer" in made.stderr
    refused = cli("convert", "digits", "-f", "npy", "-o", tmp_path / "x", "--jobs", "-1")
    assert refused.returncode == 2
    assert "--jobs -1: give a number of processes" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()
