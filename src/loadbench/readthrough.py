"""The read-through cache of a store on object storage: each file copied whole on first use,
read from the local copy after that.

Copies live under `cache_dir/<store identity>/`, so a store converted again never serves stale
files. A copy is made under a name of its own and renamed into place, so a DataLoader worker
never sees half a file; one file is fetched under a lock (two workers asking at once download
it once), the misses of a batch of files concurrently. Hits and misses are counted in every
process, DataLoader workers included (`CacheCounters`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from loadbench.errors import writing

CACHE_SLOTS = 65  # the main process and up to 64 DataLoader workers count apart


class CacheCounters:
    """Hits and misses of the read-through cache, in files and bytes, for every process.

    A small int64 tensor in shared memory with a row per process (0: the main process, 1 + id:
    a DataLoader worker), so the counts of workers reach the process that reports them.
    """

    FIELDS = ("hits", "misses", "hit_bytes", "miss_bytes")

    def __init__(self):
        import torch

        self.table = torch.zeros((CACHE_SLOTS, len(self.FIELDS)), dtype=torch.int64)
        self.table.share_memory_()

    def add(self, hit: bool, nbytes: int) -> None:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        row = self.table[0 if info is None else 1 + info.id % (CACHE_SLOTS - 1)]
        row[0 if hit else 1] += 1
        row[2 if hit else 3] += nbytes

    def snapshot(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, (int(v) for v in self.table.sum(0)), strict=True))

    def stats(self, since: dict[str, int] | None = None) -> dict[str, Any]:
        now = self.snapshot()
        d = {k: now[k] - (since or {}).get(k, 0) for k in self.FIELDS}
        files, nbytes = d["hits"] + d["misses"], d["hit_bytes"] + d["miss_bytes"]
        return {
            **d,
            "hit_rate": d["hits"] / files if files else None,
            "byte_hit_rate": d["hit_bytes"] / nbytes if nbytes else None,
        }


class ReadThroughCache:
    """Local copies of one store's files under `root`, checked against the sizes the manifest
    lists. Files are fetched by the caller's `fetch(rel, dest)` / `fetch(rels, dests)`."""

    def __init__(self, root: str, sizes: dict[str, int]):
        self.root, self.sizes = root, sizes
        self.counters = CacheCounters()

    def path(self, rel: str, fetch: Callable[[str, str], None]) -> str:
        """The local copy of `rel`, fetched whole on first use."""
        import fcntl

        dest = os.path.join(self.root, rel)
        expected = self.sizes.get(rel)
        if _valid(dest, expected):
            self.counters.add(True, os.path.getsize(dest))
            return dest
        with writing(dest, _COPYING, expected):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            lock = open(dest + ".lock", "w")  # noqa: SIM115 (closed by the with below)
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _valid(dest, expected):  # another process fetched it meanwhile
                self.counters.add(True, os.path.getsize(dest))
                return dest
            tmp = f"{dest}.part-{os.getpid()}"
            try:
                with writing(dest, _COPYING, expected):
                    fetch(rel, tmp)
                    os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        self.counters.add(False, os.path.getsize(dest))
        return dest

    def paths(self, rels: list[str], fetch: Callable[[list[str], list[str]], None]) -> list[str]:
        """Local copies of many files; those not copied yet are fetched concurrently (each
        into a name of its own, then renamed: atomic without a lock)."""
        dests = [os.path.join(self.root, rel) for rel in rels]
        missing = [i for i, d in enumerate(dests) if not _valid(d, self.sizes.get(rels[i]))]
        absent = set(missing)
        for i, dest in enumerate(dests):
            if i not in absent:
                self.counters.add(True, os.path.getsize(dest))
        if not missing:
            return dests
        tmps = [f"{dests[i]}.part-{os.getpid()}" for i in missing]
        needed = sum(self.sizes.get(rels[i]) or 0 for i in missing)
        try:
            with writing(self.root, _COPYING, needed):
                for tmp in tmps:
                    os.makedirs(os.path.dirname(tmp), exist_ok=True)
                fetch([rels[i] for i in missing], tmps)
                for i, tmp in zip(missing, tmps, strict=True):
                    os.replace(tmp, dests[i])
                    self.counters.add(False, os.path.getsize(dests[i]))
        finally:
            for tmp in tmps:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        return dests


_COPYING = "copying the store into the read-through cache at"


def _valid(path: str, expected: int | None) -> bool:
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    return expected is None or size == expected
