"""The one exception type that loadbench raises for a person to read, and the file-system
failures that are the user's to fix (a full disk, a read-only or forbidden place) said as one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator


class LoadbenchError(Exception):
    """A problem with the user's input or data: what went wrong, where, and what to do.

    The CLI prints the message on one line and exits with a non-zero code; no traceback unless
    `--debug` is given.
    """


class CorruptStoreError(LoadbenchError):
    """A store exists but its files do not match its manifest (truncated, missing, altered)."""


class OutOfSpaceError(LoadbenchError):
    """A file system ran out of space (or of the user's quota) while loadbench wrote `path`;
    `needed` bytes in all, when that is known. The free space is measured when the error is
    made (`free` keeps an earlier measure: before the partial output was removed)."""

    def __init__(self, path: str, doing: str = "writing", needed: int | None = None,
                 free: int | None = None,
                 fix: str = "free some space or choose another place"):  # fmt: skip
        free = free_bytes(path) if free is None else free
        self.path, self.doing, self.needed, self.free = path, doing, needed, free
        have = f"{_mib(free)} free" if free is not None else "no space left"
        need = f", about {_mib(needed)} needed" if needed else ""
        super().__init__(f"{doing} {path}: out of disk space ({have}{need}); {fix}")


# What each errno means for a person, and what to do about it.
_PLACE_ERRORS = {
    errno.EROFS: ("is on a read-only file system", "choose a writable place"),
    errno.EACCES: ("may not be written (permission denied)", "choose a place you may write to"),
    errno.EPERM: ("may not be written (not permitted)", "choose a place you may write to"),
    errno.ENOTDIR: ("is under a file, not a directory", "choose a path whose parents are folders"),
    errno.EEXIST: ("exists and is not a folder", "choose another path"),
    errno.ENAMETOOLONG: ("has a name too long for the file system", "choose a shorter path"),
    errno.EISDIR: ("is a directory", "choose a file path"),
}
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(error: BaseException) -> bool:
    """Whether `error` is a full disk (or quota)."""
    return isinstance(error, OutOfSpaceError) or (
        isinstance(error, OSError) and error.errno in _OUT_OF_SPACE
    )


def free_bytes(path: str) -> int | None:
    """Free space for this user on the file system of `path` (or of its nearest parent)."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        path = os.path.dirname(path) if os.path.dirname(path) != path else ""
    try:
        st = os.statvfs(path or "/")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def nearly_full(path: str) -> int | None:
    """The free bytes at `path` when its file system is all but full (under 1 MiB), else None.

    Some libraries do not pass ENOSPC on (torch.save's RuntimeError, lmdb's "Input/output
    error", a --jobs worker's report): their error, raised while writing to a file system that
    is full right then, is said as a full disk.
    """
    free = free_bytes(path)
    return free if free is not None and free < 2**20 else None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def explain_os_error(error: OSError, path: str | None = None, doing: str = "writing",
                     needed: int | None = None) -> LoadbenchError | None:  # fmt: skip
    """The user's side of an OSError (out of space, read-only, forbidden, not a directory, name
    too long) as one LoadbenchError naming the path; None for other errors (a bug, or a fault
    that is not the user's to fix)."""
    where = str(path or error.filename or "the output")
    if error.errno in _OUT_OF_SPACE:
        return OutOfSpaceError(where, doing, needed)
    if error.errno in _PLACE_ERRORS:
        what, fix = _PLACE_ERRORS[error.errno]
        return LoadbenchError(f"{doing} {where}: {_culprit(error, where)} {what}; {fix}")
    return None


def _culprit(error: OSError, where: str) -> str:
    """The path to name for an OSError: the file it names, or the folder that file was to be
    made in (not loadbench's temporary name for it)."""
    name = error.filename
    if not name:
        return where
    name = os.fspath(name)
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not os.path.exists(name):
        return os.path.dirname(name) or name
    return name


@contextlib.contextmanager
def writing(path: str, doing: str = "writing", needed: int | None = None) -> Iterator[None]:
    """Turn the user's side of an OSError raised inside the block into one LoadbenchError about
    `path` (see `explain_os_error`), and an `OutOfSpaceError` about a file inside `path` into
    one about `path`; other errors pass unchanged."""
    try:
        yield
    except OutOfSpaceError as e:
        raise OutOfSpaceError(path, doing, needed or e.needed, e.free) from None
    except OSError as e:
        explained = explain_os_error(e, path, doing, needed)
        if explained is None:
            raise
        raise explained from None


def writable_folder(path: str, doing: str = "writing") -> bool:
    """Make the folder `path` if it is missing and check that a file can be made in it, so that a
    place that cannot be written fails at once, as one LoadbenchError, and not after the work.
    Returns whether the folder was made here."""
    made = not os.path.exists(path)
    with writing(path, doing):
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".loadbench-probe-")
        os.close(fd)
        os.remove(probe)
    return made


def reserve(paths: list[str], doing: str = "writing") -> None:
    """Allocate the disk blocks of files already at their full size (sparse, as `open_memmap`
    makes them) before anything is written into them.

    A write through a memory map into a hole the file system cannot fill kills the process
    with SIGBUS; reserved blocks turn a full disk into an `OutOfSpaceError` here instead.
    `posix_fallocate` allocates without writing where the file system can, and glibc falls back
    to writing a byte per block where it cannot.
    """
    sizes = [os.path.getsize(path) for path in paths]
    for path, size in zip(paths, sizes, strict=True):
        if size == 0:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in _OUT_OF_SPACE:
                raise OutOfSpaceError(path, doing, sum(sizes)) from None
            raise
        finally:
            os.close(fd)
