"""Cold-cache runs: evict a store's files from the page cache, and measure whether it worked.

Eviction is `posix_fadvise(POSIX_FADV_DONTNEED)` on every file, which needs no root. The kernel
may ignore it (pages another process maps, some filesystems), so residency is measured before
and after with `mincore(2)` on a read-only mapping that touches no page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

import numpy as np

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
    ]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def store_files(root: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        found.extend(os.path.join(dirpath, n) for n in names)
    return sorted(found)


def resident_pages(path: str) -> tuple[int, int] | None:
    """(resident pages, total pages) of a file, or None where mincore is not available."""
    size = os.path.getsize(path)
    if size == 0:
        return (0, 0)
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vector) != 0:
                return None
            resident = int(np.count_nonzero(np.frombuffer(vector, dtype=np.uint8) & 1))
            return resident, pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: list[str]) -> float | None:
    resident = total = 0
    for path in paths:
        counts = resident_pages(path)
        if counts is None:
            return None
        resident += counts[0]
        total += counts[1]
    return resident / total if total else 0.0


def evict(root: str) -> dict[str, Any]:
    """Drop a store's files from the page cache; report residency before and after."""
    paths = store_files(root)
    before = resident_fraction(paths)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    after = resident_fraction(paths)
    effective = None if after is None else after < 0.05
    return {
        "files": len(paths),
        "bytes": sum(os.path.getsize(p) for p in paths),
        "resident_before": before,
        "resident_after": after,
        "effective": effective,
    }
