"""One `loadbench bench` at a time per results directory: the lock file `bench.lock`.

Two benches on one results directory would each read the same runs.jsonl at their start, run
every pending run twice and record every key twice. So `bench` holds `bench.lock` in the results
directory for its whole run, with `flock`, and writes into it who holds it
({pid, host, started, command}); a second bench is refused at once with one line naming the
holder (waiting is left to the user: run it again when the first is done).

- `flock` is released by the kernel when its holder dies, however it dies (`kill -9`, OOM): the
  file a killed bench leaves behind is taken over by the next bench on that host, with a note.
- The file's content is the fallback where `flock` does not reach (some network file systems
  lock per client only): a lock written by a live process of this host, or by any other host,
  is refused even when `flock` succeeds. A lock of another host is never taken over: whether
  that bench still runs cannot be known from here, so the message says to remove the file if
  it does not.
- The ranks of one multi-node experiment run the same bench on every node into one results
  directory: each node then takes a lock of its own host (`bench.HOST.lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from datetime import datetime

from loadbench.errors import LoadbenchError, writing
from loadbench.util import now_iso, pid_alive

LOCK = "bench.lock"


def lock_path(results_dir: str, per_host: bool = False) -> str:
    name = f"bench.{socket.gethostname()}.lock" if per_host else LOCK
    return os.path.join(results_dir, name)


def is_lock_file(name: str) -> bool:
    """Whether a file name in a results directory is a lock (not a result)."""
    return name == LOCK or (name.startswith("bench.") and name.endswith(".lock"))


@contextlib.contextmanager
def results_lock(results_dir: str, per_host: bool = False) -> Iterator[str | None]:
    """Hold the results directory's lock for the block; yields a note when the lock of a bench
    that no longer runs was taken over. Raises LoadbenchError naming the holder when another
    bench holds it."""
    path = lock_path(results_dir, per_host)
    with writing(path, "locking the results directory with"):
        fd = _open_locked(path)
        try:
            took_over = _check_previous(path, _read_holder(fd))
            _write_holder(fd)
        except BaseException:  # not ours: the file stays as it is
            os.close(fd)
            raise
    try:
        yield took_over
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, path):  # not a file someone else put there since
                os.unlink(path)
        os.close(fd)


def _open_locked(path: str) -> int:
    """The lock file, open and flocked. A holder that finishes removes the file; whoever opened
    it just before locks a file no longer there, so the lock is taken again on the new one."""
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _flock(fd):
                raise LoadbenchError(_refusal(path, _read_holder(fd)))
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise LoadbenchError(f"{path} keeps being replaced: is another bench starting in a loop?")


def _flock(fd: int) -> bool:
    """Whether an exclusive flock was taken (True too where flock is not supported: the file's
    content then decides)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except (ImportError, OSError):  # ENOLCK, EOPNOTSUPP on some network file systems
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(),
              "command": shlex.join(sys.argv)}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process (it has not written its name yet)"
    return (
        f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        f" ({holder.get('command', '?')})"
    )


def _refusal(path: str, holder: dict | None) -> str:
    return (
        f"{os.path.dirname(path)} is in use by another loadbench bench: {_describe(holder)}; "
        "wait for it to finish or choose another --out"
    )


def _check_previous(path: str, holder: dict | None) -> str | None:
    """Refuse a lock whose holder may still run although flock was taken; a note when the
    holder is a dead process of this host."""
    if holder is None:
        return None
    if holder.get("host") != socket.gethostname():
        raise LoadbenchError(
            f"{os.path.dirname(path)} is in use by a bench on another machine: "
            f"{_describe(holder)}; if that bench is no longer running, remove {path}"
        )
    if _alive(holder):
        raise LoadbenchError(_refusal(path, holder))
    return f"took over {path} from a bench that is no longer running: {_describe(holder)}"


def _alive(holder: dict) -> bool:
    """Whether the holder (of this host) still runs: its pid exists and was not given to a
    newer process since the lock was taken (pids are reused soon in containers)."""
    import psutil

    pid = holder["pid"]
    if pid == os.getpid() or not pid_alive(pid):
        return False
    try:
        born = psutil.Process(pid).create_time()
        taken = datetime.fromisoformat(holder["started"]).timestamp()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return True
    return born <= taken + 1  # `started` has whole seconds
