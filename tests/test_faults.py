"""Out of space and places that cannot be written: every writer ends with one line naming the
path (and what was needed when that is known), exit code 2, and nothing partial left behind.

Full disks are real: a tmpfs of a few MiB mounted in a user namespace (`unshare -rm`), so no
root is needed and nothing outlives the test. Where that cannot be made the tests skip; the
errno handling below them runs everywhere with injected errors.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import loadbench
from loadbench.errors import (
    LoadbenchError,
    OutOfSpaceError,
    explain_os_error,
    reserve,
    writing,
)
from loadbench.util import atomic_file, write_text_atomic

LOADBENCH = [sys.executable, "-m", "loadbench"]
BIG = "synthetic:cifar-like?count=20000"  # 61 MB of pixels: more than any small file system
SMALL = "synthetic:cifar-like?count=200&eval_count=50"


@dataclass
class Outcome:
    command: str
    rc: int
    stderr: str
    left: list[str]  # what the command left in the file system

    def one_line_error(self) -> str:
        assert self.rc == 2, f"{self.command}: exit {self.rc}\n{self.stderr}"
        assert "Traceback" not in self.stderr and "Exception ignored" not in self.stderr
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error")]
        assert errors == lines[-1:] and errors[0].startswith("error: "), f"{self.command}: {lines}"
        return errors[0]


def in_small_fs(tmp_path: Path, *commands: str, size: str = "8m", ro: bool = False,
                env: dict[str, str] | None = None) -> list[Outcome]:  # fmt: skip
    """Run each shell command (`FS` in it is the file system's mount point) on a fresh tmpfs of
    `size`, emptied between commands; each outcome with what was left there."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to mount a small file system")
    fs, logs = tmp_path / "fs", tmp_path / "logs"
    fs.mkdir()
    logs.mkdir()
    options = f"size={size}" + (",ro" if ro else "")
    lines = [f"mount -t tmpfs -o {options} tmpfs {fs} || exit 77"]
    for k, command in enumerate(commands):
        command = command.replace("FS", str(fs))
        lines += [
            f"{command} >{logs}/{k}.out 2>{logs}/{k}.err; echo $? >{logs}/{k}.rc",
            f"ls -A {fs} >{logs}/{k}.left",
            f"rm -rf {fs}/* {fs}/.[!.]* 2>/dev/null; true",
        ]
    environ = {**os.environ, "COLUMNS": "300", **(env or {})}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], capture_output=True,
                          text=True, env=environ)  # fmt: skip
    if done.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr[-300:]}")
    return [
        Outcome(command, int((logs / f"{k}.rc").read_text()),
                (logs / f"{k}.err").read_text(), (logs / f"{k}.left").read_text().split())
        for k, command in enumerate(commands)
    ]  # fmt: skip


def loadbench_cli(*args: str) -> str:
    return shlex.join([*LOADBENCH, *args])


# -- a full disk ---------------------------------------------------------------------------------

DEFAULT_FORMATS = ["npy", "hdf5", "webdataset", "tensor"]  # SIGBUS, SIGSEGV, a traceback before
OTHER_FORMATS = ["zarr", "lmdb", "tfrecord", "arrayrecord", "files-png", "files-jpeg"]


def _check_full(outcome: Outcome) -> str:
    line = outcome.one_line_error()
    assert "out of disk space" in line, line
    assert outcome.left == [], f"{outcome.command} left {outcome.left}"
    return line


def test_convert_into_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    outcomes = in_small_fs(
        tmp_path,
        *[loadbench_cli("convert", BIG, "-f", name, "-o", "FS/store") for name in DEFAULT_FORMATS],
        loadbench_cli("convert", BIG, "-f", "files-png", "--jobs", "2", "-o", "FS/store"),
    )
    for outcome in outcomes:
        line = _check_full(outcome)
        assert str(tmp_path / "fs" / "store") in line
    # npy sizes its files up front: it says how much its train split needed (20,000 x 3,072
    # bytes, 58.6 MiB, and the labels)
    assert "about 58.7 MiB needed" in _check_full(outcomes[0])


@pytest.mark.slow
def test_every_format_and_peer_into_a_full_disk(tmp_path):
    from loadbench.formats import get_format, peer_names

    peers = [name for name in peer_names() if get_format(name).missing() is None]
    outcomes = in_small_fs(
        tmp_path,
        *[loadbench_cli("convert", BIG, "-f", name, "-o", "FS/store")
          for name in OTHER_FORMATS + peers],
        loadbench_cli("convert", BIG, "-f", "all", "-o", "FS/stores"),
        loadbench_cli("convert", BIG, "-f", "npy", "--jobs", "2", "-o", "FS/store"),
        loadbench_cli("convert", BIG, "-f", "webdataset", "--jobs", "2", "-o", "FS/store"),
    )  # fmt: skip
    for outcome in outcomes[:-3]:
        _check_full(outcome)
    all_formats, *jobs = outcomes[-3:]
    all_formats.one_line_error()  # the stores finished before the disk filled stay
    for outcome in jobs:
        _check_full(outcome)


def test_a_run_that_fills_the_disk_removes_its_new_directory(tmp_path):
    outcome, = in_small_fs(
        tmp_path,
        loadbench_cli("train", SMALL, "--model", "mlp", "--epochs", "1", "--out", "FS/run"),
        size="4m",
    )  # fmt: skip
    line = _check_full(outcome)
    assert "checkpoint.pt" in line


def test_staging_an_upload_in_a_full_tmpdir_says_to_set_tmpdir(tmp_path):
    script = (
        "import sys, fsspec; from loadbench.cli import main; "
        "fsspec.filesystem('memory').mkdir('/bucket'); sys.argv[0] = 'loadbench'; main()"
    )
    outcome, = in_small_fs(
        tmp_path,
        shlex.join([sys.executable, "-c", script, "convert", BIG, "-f", "npy", "-o",
                    "memory://bucket/store"]),
        env={"TMPDIR": str(tmp_path / "fs")},
    )  # fmt: skip
    line = _check_full(outcome)
    assert "memory://bucket/store" in line and "TMPDIR" in line and "about 58.7 MiB needed" in line


def test_results_and_report_into_a_full_disk(tmp_path):
    stores = tmp_path / "stores"
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: t\ndatasets: [{source: 'synthetic:cifar-like?count=64&eval_count=16&size=8', "
        "name: tiny}]\nformats: [npy]\nepochs: 1\nrepeats: 1\nmode: loader-only\n"
    )
    results = tmp_path / "results"
    subprocess.run([*LOADBENCH, "bench", str(exp), "--out", str(results), "--stores",
                    str(stores)], check=True, capture_output=True)  # fmt: skip
    filler = "head -c 8388608 /dev/zero > FS/filler 2>/dev/null;"
    bench, report = in_small_fs(
        tmp_path,
        f"{filler} {loadbench_cli('bench', str(exp), '--out', 'FS/r', '--stores', str(stores))}",
        f"{filler} {loadbench_cli('report', str(results), '--out', 'FS/report')}",
    )  # fmt: skip
    for outcome, place in ((bench, "r"), (report, "report")):
        line = outcome.one_line_error()
        assert "out of disk space" in line and str(tmp_path / "fs" / place) in line, line
        assert outcome.left == ["filler"] or outcome.left == ["filler", place], outcome.left


# -- places that cannot be written ---------------------------------------------------------------


def test_a_read_only_file_system_is_one_line_for_every_writer(tmp_path):
    outcomes = in_small_fs(
        tmp_path,
        loadbench_cli("convert", SMALL, "-f", "npy", "-o", "FS/store"),
        loadbench_cli("convert", SMALL, "-f", "all", "-o", "FS/stores"),
        loadbench_cli("train", SMALL, "--model", "mlp", "--epochs", "1", "--out", "FS/run"),
        loadbench_cli("lr-find", SMALL, "--out", "FS/lr"),
        ro=True,
    )
    for outcome in outcomes:
        line = outcome.one_line_error()
        assert "read-only file system" in line and str(tmp_path / "fs") in line, line


def test_outputs_under_a_file_or_with_too_long_a_name(tmp_path):
    (tmp_path / "file").write_text("")
    cases = {
        "under a file": str(tmp_path / "file" / "store"),
        "name too long": str(tmp_path / ("x" * 300)),
        "not a store": str(tmp_path / "file"),
    }
    for why, out in cases.items():
        done = subprocess.run([*LOADBENCH, "convert", SMALL, "-f", "npy", "-o", out],
                              capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "300"})  # fmt: skip
        line = Outcome("convert", done.returncode, done.stderr, []).one_line_error()
        assert why.split()[-1] in line and "internal error" not in line, line
    assert sorted(os.listdir(tmp_path)) == ["file"]


# -- the errno handling, with injected errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("code", "says"),
    [(errno.ENOSPC, "out of disk space"), (errno.EDQUOT, "out of disk space"),
     (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
     (errno.ENOTDIR, "under a file"), (errno.ENAMETOOLONG, "name too long")],
)  # fmt: skip
def test_explain_os_error_says_what_and_what_to_do(tmp_path, code, says):
    error = explain_os_error(OSError(code, os.strerror(code)), str(tmp_path / "out"), "making")
    assert isinstance(error, LoadbenchError)
    assert says in str(error) and str(tmp_path / "out") in str(error)
    assert str(error).count(";") >= 1  # and what to do
    assert isinstance(error, OutOfSpaceError) == (code in (errno.ENOSPC, errno.EDQUOT))


def test_other_os_errors_are_not_explained_away():
    assert explain_os_error(OSError(errno.EIO, "Input/output error"), "/x") is None
    with pytest.raises(OSError) as raised, writing("/x"):
        raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(raised.value, LoadbenchError)


def test_writing_names_the_outer_path_and_keeps_what_was_needed(tmp_path):
    with pytest.raises(OutOfSpaceError) as raised, writing(str(tmp_path), "converting into"):
        raise OutOfSpaceError(str(tmp_path / "inner.npy"), "writing", needed=5 << 20)
    assert raised.value.path == str(tmp_path) and raised.value.needed == 5 << 20
    assert str(raised.value).startswith(f"converting into {tmp_path}: out of disk space")
    assert "about 5.0 MiB needed" in str(raised.value)


def test_reserve_turns_a_full_disk_into_an_error_before_any_write(tmp_path, monkeypatch):
    path = tmp_path / "images.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(1000, 1000)).flush()
    reserve([str(path)])  # room enough: allocated
    assert os.stat(path).st_blocks * 512 >= 1_000_000

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutOfSpaceError) as raised:
        reserve([str(path)], "converting into")
    assert raised.value.needed == os.path.getsize(path)


def test_atomic_writes_that_fail_leave_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(OutOfSpaceError) as raised, atomic_file(str(target)) as f:
        f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device", f.name)
    assert str(target) in str(raised.value)
    assert os.listdir(tmp_path) == []
    write_text_atomic(str(target), "whole")
    assert target.read_text() == "whole"


def test_a_failed_conversion_removes_its_partial_store(tmp_path, monkeypatch, rgb_source):
    """An ENOSPC from inside a writer (here: the labels of a split) ends the conversion with
    OutOfSpaceError about the store, and no partial folder is left."""
    real_save = np.save

    def full_save(file, *args, **kwargs):
        if str(file).endswith("labels.npy"):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_save)
    with pytest.raises(OutOfSpaceError) as raised:
        loadbench.convert(rgb_source, "files-png", tmp_path / "store")
    assert str(tmp_path / "store") in str(raised.value)
    assert os.listdir(tmp_path) == []


def test_a_run_that_fills_the_disk_after_a_checkpoint_is_kept_to_resume(tmp_path, monkeypatch):
    from loadbench.training import runfiles
    from loadbench.training.config import TrainConfig
    from loadbench.training.train import train

    source = loadbench.load_source("synthetic:cifar-like?count=64&eval_count=16&size=8&seed=3")
    store = loadbench.convert(source, "npy", tmp_path / "store")
    real_save = runfiles.ckpt.save_atomic
    saved = []

    def save_once(state, path):
        if saved:
            raise OutOfSpaceError(path, "writing")
        saved.append(path)
        real_save(state, path)

    monkeypatch.setattr(runfiles.ckpt, "save_atomic", save_once)
    out = tmp_path / "run"
    config = TrainConfig(data=store.path, epochs=3, out=str(out), widths="8", batch_size=32)
    with pytest.raises(OutOfSpaceError, match=f"continue it with --resume {out}"):
        train(config)
    assert (out / "checkpoint.pt").is_file()
    monkeypatch.setattr(runfiles.ckpt, "save_atomic", real_save)
    resumed = train(config, resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]


def test_ctrl_c_during_verify_says_interrupted_and_exits_130(tmp_path, monkeypatch, capsys):
    """typer turns Ctrl-C into a silent exit 130; the user is told."""
    import loadbench.verify
    from loadbench.cli import main

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loadbench.verify, "verify_path", pressed)
    monkeypatch.setattr(sys, "argv", ["loadbench", "verify", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_full_disk_under_the_read_through_cache_is_one_error(tmp_path):
    from loadbench.readthrough import ReadThroughCache

    cache = ReadThroughCache(str(tmp_path / "cache"), {"a.npy": 5 << 20, "b.npy": 1 << 20})

    def fetch(rel, dest):
        with open(dest, "wb") as f:
            f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", dest)

    def fetch_many(rels, dests):
        for rel, dest in zip(rels, dests, strict=True):
            fetch(rel, dest)

    with pytest.raises(OutOfSpaceError, match="read-through cache") as raised:
        cache.path("a.npy", fetch)
    assert raised.value.needed == 5 << 20
    with pytest.raises(OutOfSpaceError, match="about 6.0 MiB needed"):
        cache.paths(["a.npy", "b.npy"], fetch_many)
    left = [p.name for p in (tmp_path / "cache").iterdir()]
    assert not [name for name in left if ".part-" in name], left
