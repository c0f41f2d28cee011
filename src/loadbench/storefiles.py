"""The files of a store, wherever they are: a local directory or an fsspec URL (`s3://...`).

Readers never join paths themselves: they ask a `StoreFiles` for a file by its path relative to
the store's root. A store on object storage is read in place (byte ranges, whole objects, file
objects) or, once `use_cache` is called with a cache directory, through local copies
(`readthrough.py`), which is how formats that need a real file (LMDB, zipped zarr) read remote
stores.
"""

from __future__ import annotations

import io
import math
import os
from tokenize import TokenError
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.readthrough import ReadThroughCache
from loadbench.remote import coalesce, filesystem, is_url, join, public_options, remote_errors

# What numpy raises for a damaged `.npy` file (its header is a Python literal, tokenized).
NPY_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TokenError)

READ_THROUGH_OPTIONS = {
    "cache_dir": Option(
        None, "s3:// stores: read through a local copy kept here", shown="read in place"
    ),
}


class StoreFiles:
    """Reads the files of one store by their paths relative to its root.

    `local_path` gives a real file (the file itself, or its read-through copy); the other
    methods read any store. Picklable: the fsspec filesystem is made again in each process.
    """

    def __init__(self, root: str, options: dict[str, Any] | None = None,
                 cache_dir: str | None = None):  # fmt: skip
        self.remote = is_url(root)
        self.root = root.rstrip("/") if self.remote else root
        self.options = dict(options or {})
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
        self.cache: ReadThroughCache | None = None  # set by `use_cache`, once the store is known
        self._fs = None
        self._pid: int | None = None

    def use_cache(self, identity: str, sizes: dict[str, int]) -> None:
        """Read a remote store through local copies under `cache_dir/identity` (no-op for a
        local store or without a cache directory); `sizes` are the manifest's file sizes."""
        if self.remote and self.cache_dir:
            self.cache = ReadThroughCache(os.path.join(self.cache_dir, identity), sizes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"], state["_pid"] = None, None
        return state

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def counters(self):
        return self.cache.counters if self.cache is not None else None

    @property
    def cache_root(self) -> str:
        return self.cache.root

    @property
    def has_local_files(self) -> bool:
        """Whether `local_path` works: a local store, or a remote one with a cache."""
        return not self.remote or self.cached

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._base = filesystem(self.root, self.options)
            self._pid = os.getpid()
        return self._fs

    def remote_path(self, rel: str) -> str:
        """The path of `rel` inside the remote filesystem (no protocol)."""
        self.fs  # noqa: B018 (sets _base)
        return f"{self._base.rstrip('/')}/{rel}"

    def errors(self):
        return remote_errors(self.root, self.options.get("endpoint_url"))

    # -- real files ------------------------------------------------------------------------
    def local_path(self, rel: str) -> str:
        if not self.remote:
            return os.path.join(self.root, rel)
        if not self.cached:
            raise LoadbenchError(
                f"{join(self.root, rel)} must be read from a local file; pass --cache-dir DIR "
                "(or storage.cache_dir in an experiment) to read the store through a local copy"
            )
        return self.cache.path(rel, self._get_one)

    def local_paths(self, rels: list[str]) -> list[str]:
        """`local_path` of many files; copies not made yet are fetched concurrently."""
        if not self.remote or not self.cached:
            return [self.local_path(rel) for rel in rels]
        return self.cache.paths(rels, self._get_many)

    def _get_one(self, rel: str, dest: str) -> None:
        with self.errors():
            self.fs.get_file(self.remote_path(rel), dest)

    def _get_many(self, rels: list[str], dests: list[str]) -> None:
        with self.errors():
            self.fs.get([self.remote_path(rel) for rel in rels], dests)

    # -- bytes -----------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        """The whole file."""
        if self.has_local_files:
            with open(self.local_path(rel), "rb") as f:
                return f.read()
        with self.errors():
            return self.fs.cat_file(self.remote_path(rel))

    def read_many(self, rels: list[str]) -> list[bytes]:
        """Whole files, fetched concurrently from object storage."""
        if self.has_local_files:
            return [self.read(rel) for rel in rels]
        paths = [self.remote_path(rel) for rel in rels]
        with self.errors():
            found = self.fs.cat(paths, on_error="raise")
        return [found[p] for p in paths]

    def read_ranges(self, rels: list[str], starts: list[int], stops: list[int]) -> list[bytes]:
        """Byte ranges [start, stop) of files, fetched concurrently from object storage (ranges
        of one file close together in one request)."""
        if self.has_local_files:
            out = []
            for rel, start, stop in zip(rels, starts, stops, strict=True):
                with open(self.local_path(rel), "rb") as f:
                    out.append(os.pread(f.fileno(), stop - start, start))
            return out
        requests: list[tuple[str, int, int]] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(rels)  # (request, offset in it)
        for rel in dict.fromkeys(rels):
            mine = [i for i, r in enumerate(rels) if r == rel]
            ranges, owner = coalesce([starts[i] for i in mine], [stops[i] for i in mine])
            first = len(requests)
            requests += [(rel, lo, hi) for lo, hi in ranges]
            for i, k in zip(mine, owner, strict=True):
                where[i] = (first + k, starts[i] - ranges[k][0])
        with self.errors():
            data = self.fs.cat_ranges(
                [self.remote_path(r) for r, _, _ in requests], [lo for _, lo, _ in requests],
                [hi for _, _, hi in requests], on_error="raise",
            )  # fmt: skip
        return [
            data[k][at : at + stop - start]
            for (k, at), start, stop in zip(where, starts, stops, strict=True)
        ]

    def read_npy(self, rel: str):
        """The array of a whole `.npy` file; ValueError (or another of `NPY_ERRORS`) when it is
        none, or when its header does not describe exactly the bytes after it."""
        import numpy as np

        data = self.read(rel)
        _check_npy(rel, data[:NPY_HEAD], len(data))
        return np.load(io.BytesIO(data))

    def check_npy(self, rel: str) -> tuple[tuple[int, ...], Any, bool, int]:
        """The `.npy` file's header as `npy_header` reads it; ValueError unless it describes
        exactly the bytes after it: `np.load` allocates what the header asks for before reading,
        terabytes if it is damaged."""
        size = self.sizes([rel])[rel]
        if size is None:
            raise FileNotFoundError(f"{rel} is missing")
        return _check_npy(rel, self.read_ranges([rel], [0], [min(size, NPY_HEAD)])[0], size)

    def open(self, rel: str, block_size: int = 4 << 20):
        """A seekable binary file object (h5py reads remote HDF5 through one)."""
        if self.has_local_files:
            return open(self.local_path(rel), "rb")
        with self.errors():
            return self.fs.open(
                self.remote_path(rel), "rb", block_size=block_size, cache_type="blockcache"
            )

    # -- what is there ---------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        """Whether the file is there (asked of the store itself, never of the cache)."""
        if not self.remote:
            return os.path.isfile(os.path.join(self.root, rel))
        with self.errors():
            return self.fs.exists(self.remote_path(rel))

    def read_direct(self, rel: str) -> bytes:
        """The file as the store holds it now, never from the cache (the manifest)."""
        if not self.remote:
            with open(os.path.join(self.root, rel), "rb") as f:
                return f.read()
        with self.errors():
            return self.fs.cat_file(self.remote_path(rel))

    def sizes(self, rels: list[str]) -> dict[str, int | None]:
        """The size of each file in the store (None: missing); one listing on object
        storage."""
        if not self.remote:
            return {rel: _size(os.path.join(self.root, rel)) for rel in rels}
        base = self.remote_path("").rstrip("/")
        with self.errors():
            found = self.fs.find(base, detail=True)
        listed = {name[len(base) + 1 :]: info.get("size") for name, info in found.items()}
        return {rel: listed.get(rel) for rel in rels}

    def cache_stats(self, since: dict[str, int] | None = None) -> dict[str, Any] | None:
        return self.counters.stats(since) if self.cached else None

    def describe(self) -> dict[str, Any]:
        """What a record may say about where the store is (no secrets)."""
        return {
            "url": self.root if self.remote else None,
            "remote": self.remote,
            **public_options(self.options),
            "cache_dir": self.cache_dir if self.cached else None,
        }


NPY_HEAD = 4096  # np.save writes headers of 128 bytes (version 1) up to a few KiB


def npy_header(head: bytes, rel: str) -> tuple[tuple[int, ...], Any, bool, int]:
    """(shape, dtype, fortran order, offset of the data) from the first bytes of a `.npy` file;
    one of `NPY_ERRORS` when they are no header of a version numpy writes."""
    import numpy as np

    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{rel} is a .npy file of version {version}, which loadbench never writes")
    shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
    return tuple(shape), dtype, fortran, f.tell()


def _check_npy(rel: str, head: bytes, size: int) -> tuple[tuple[int, ...], Any, bool, int]:
    header = shape, dtype, _, offset = npy_header(head, rel)
    if dtype.hasobject:
        raise ValueError(f"{rel} holds Python objects")
    declared = math.prod(shape) * dtype.itemsize
    if offset + declared != size:
        raise ValueError(
            f"{rel} declares {shape} {dtype} ({declared:,} bytes), it holds {size - offset:,}"
        )
    return header


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
