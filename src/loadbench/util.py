"""Small helpers every layer uses: atomic files, strict JSON, timestamps, process lifetime."""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

from loadbench.errors import LoadbenchError, OutOfSpaceError, explain_os_error, nearly_full


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False,
                **open_kwargs: Any) -> Iterator[IO]:  # fmt: skip
    """A file to write that appears at `path` only when the block ends without an error:
    written under a unique name beside it, then renamed over it. A reader never sees half a
    file, and a crash leaves the old file (or none). With `fsync`, the data is on disk before
    the rename, so a power cut cannot leave an empty file under the new name.

    The temporary name is opened with `open` (not mkstemp, whose files are private 0600), so
    the file gets the usual umask permissions.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        explained = _explained(e, path)  # before the partial file frees its space
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if explained is not None:
            raise explained from e
        raise


def _explained(error: BaseException, path: str) -> Exception | None:
    """The user's side of a failed write of `path` as one LoadbenchError (a full disk, a
    read-only or forbidden place); None for anything else. Writers that wrap the file
    system's error in their own are said as a full disk when it is (`nearly_full`)."""
    if isinstance(error, OSError):
        return explain_os_error(error, path)
    if isinstance(error, Exception) and not isinstance(error, LoadbenchError):
        free = nearly_full(path)
        if free is not None:
            return OutOfSpaceError(path, "writing", free=free)
    return None


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> str:
    with atomic_file(path, fsync=fsync) as f:
        f.write(text)
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = None,
                      fsync: bool = False) -> str:  # fmt: skip
    """`data` as strict JSON (see `clean`), atomically."""
    text = json.dumps(clean(data), indent=indent, allow_nan=False)
    return write_text_atomic(path, text, fsync=fsync)


def clean(value: Any) -> Any:
    """Strict JSON: NumPy scalars as numbers, tuples as lists, NaN and infinities as null,
    anything else as its string."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def now_iso() -> str:
    """The local time with its UTC offset, to the second: how every record is stamped."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so that a
    worker, a benchmark run or a rank whose parent was killed does not go on computing on its
    own. False where there is no prctl (not Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C off for the block, which it would otherwise cut in half: a Ctrl-C pressed
    meanwhile is raised when the block ends. (Masking SIGINT would not do: the kernel hands it
    to another thread, and Python raises it in the main thread all the same.) Only the main
    thread can set a signal handler; elsewhere the block runs unprotected."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed and callable(previous):
        previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt
    elif pressed and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_budget(workers: int) -> int:
    """The cores a run's loader may use, as a run states it: its worker processes, or the main
    process when it has none, at most the cores it can run on. Peers that load with threads
    (DALI, tf.data, SPDL, Grain, FFCV) get this many threads, so that every loader of a
    comparison runs on the same budget."""
    return min(max(1, workers), usable_cores())
