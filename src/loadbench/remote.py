"""The files of a store, wherever they are: a local directory or an fsspec URL (`s3://...`).

A store on object storage is read in place, by byte ranges (`npy`, the record formats), file
objects (`hdf5`), fsspec's zarr store (`zarr`) or whole objects (`files-*`), or through a local
read-through cache (`cache_dir`): each file is copied whole on first use and read from the local
copy after that, which is how LMDB and zipped zarr (formats that need a real file) read remote
stores. The cache is keyed by the store's identity, so a store converted again never serves
stale files, and its hits and misses are counted in every process (DataLoader workers included).

Credentials and endpoints come only from the standard environment and configuration of fsspec
and the AWS SDK (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
`AWS_ENDPOINT_URL`, `~/.aws/config`), or from `storage_options` given in code; loadbench never
writes them anywhere: only a URL and an endpoint URL appear in its records.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import numpy as np

from loadbench.errors import LoadbenchError

# Protocols that name local files; anything else with "://" is read through fsspec.
LOCAL_PROTOCOLS = ("file", "local")
# Keys of `storage_options` that loadbench may record (everything else could be a secret).
PUBLIC_OPTIONS = ("endpoint_url",)
CACHE_SLOTS = 65  # the main process and up to 64 DataLoader workers count apart
# Byte ranges of one object closer than this are fetched in one request: on object storage a
# request costs milliseconds whatever its size, so reading a gap is cheaper than another request.
COALESCE_GAP = 1 << 20
COALESCE_MAX = 16 << 20  # ...up to requests of this size


def coalesce(starts: list[int], stops: list[int], gap: int = COALESCE_GAP,
             limit: int = COALESCE_MAX) -> tuple[list[tuple[int, int]], list[int]]:  # fmt: skip
    """Merge ranges of one file whose gaps are under `gap` bytes (into requests of at most
    `limit` bytes, unless one range alone is larger): (merged ranges, the merged range of each
    input range)."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    merged: list[list[int]] = []
    owner = [0] * len(starts)
    for i in order:
        lo, hi = starts[i], stops[i]
        if merged and lo - merged[-1][1] <= gap and max(hi, merged[-1][1]) - merged[-1][0] <= limit:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
        owner[i] = len(merged) - 1
    return [(a, b) for a, b in merged], owner


def is_url(path: str) -> bool:
    """True for an fsspec URL of a remote filesystem (`s3://bucket/key`), not a local path."""
    protocol, sep, _ = str(path).partition("://")
    return bool(sep) and protocol not in LOCAL_PROTOCOLS


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a URL or a local path."""
    if is_url(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def storage_options(endpoint_url: str | None = None, retries: int | None = None) -> dict:
    """fsspec options for an S3-compatible store: the endpoint (else `AWS_ENDPOINT_URL` or
    AWS's own) and how often a failed request is tried again, with exponential backoff."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if retries is not None:  # botocore's standard mode: exponential backoff with jitter
        options["config_kwargs"] = {"retries": {"max_attempts": retries, "mode": "standard"}}
    return options


def public_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that may be written into records: no keys, tokens or secrets."""
    return {k: v for k, v in options.items() if k in PUBLIC_OPTIONS}


def filesystem(url: str, options: dict[str, Any]):
    """(fsspec filesystem, path inside it) for `url`, with one clear error for a bad scheme."""
    import fsspec

    protocol = url.partition("://")[0]
    if protocol in ("s3", "s3a"):
        _check_s3_credentials(url, options)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ValueError as e:
        if "not known" in str(e) or "Protocol" in str(e):
            raise LoadbenchError(
                f"{url}: unknown URL scheme {protocol}://; use a local path or an fsspec URL "
                "such as s3://bucket/prefix"
            ) from None
        raise LoadbenchError(f"{url}: {e}") from None
    except ImportError as e:
        raise LoadbenchError(
            f"{url}: the {protocol}:// filesystem needs a package that is not installed ({e})"
        ) from None


def _check_s3_credentials(url: str, options: dict[str, Any]) -> None:
    """Without credentials s3fs would quietly go anonymous, and a private bucket would then
    fail on every request with "access denied"; say what is missing instead. Anonymous access
    (a public bucket) is asked for with `anon: true` or FSSPEC_S3_ANON=true."""
    import fsspec.config

    if options.get("anon") or fsspec.config.conf.get("s3", {}).get("anon"):
        return
    if options.get("key") or options.get("profile"):
        return
    import botocore.session

    if botocore.session.Session().get_credentials() is None:
        raise LoadbenchError(
            f"{url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) in the environment, or FSSPEC_S3_ANON=true for a public bucket"
        )


@contextlib.contextmanager
def remote_errors(url: str, endpoint: str | None = None):
    """Turn the SDK's many exceptions into one line that says what to do."""
    try:
        yield
    except LoadbenchError:
        raise
    except Exception as e:  # botocore, aiohttp and s3fs errors have no common base but these
        raise LoadbenchError(explain_remote_error(url, e, endpoint)) from None


def explain_remote_error(url: str, error: Exception, endpoint: str | None = None) -> str:
    name = type(error).__name__
    text = str(error)
    where = endpoint or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
        return (
            f"{url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment"
        )
    missing = isinstance(error, FileNotFoundError) and "bucket" in text.lower()
    if "NoSuchBucket" in text or missing:
        bucket = url.partition("://")[2].split("/")[0]
        return f"{url}: bucket {bucket!r} does not exist at {where}; create it first"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        first = text.splitlines()[0][:200] if text else name
        return f"{url}: access denied at {where} ({first}); check the credentials"
    if isinstance(error, FileNotFoundError):
        return f"{url}: not found ({text.splitlines()[0][:200] if text else name})"
    connection = ("EndpointConnectionError", "ConnectionError", "ClientConnectorError",
                  "ConnectTimeoutError", "ReadTimeoutError", "ServerDisconnectedError")  # fmt: skip
    if name in connection or isinstance(error, (ConnectionError, TimeoutError)):
        return (
            f"{url}: cannot reach {where} ({name}); check that the server is up and "
            "AWS_ENDPOINT_URL (or the experiment's storage.endpoint_url) points at it"
        )
    return f"{url}: {name}: {text.splitlines()[0][:300] if text else ''}"


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


class StoreFiles:
    """Reads the files of one store by their paths relative to its root.

    `local_path` gives a real file (the file itself, or its read-through copy); the other
    methods read any store. Picklable: the fsspec filesystem is made again in each process.
    """

    def __init__(
        self,
        root: str,
        options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        identity: str | None = None,
        sizes: dict[str, int] | None = None,
    ):
        self.remote = is_url(root)
        self.root = root.rstrip("/") if self.remote else root
        self.options = dict(options or {})
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
        self.identity = identity or "store"
        self.sizes = sizes or {}
        self.counters = CacheCounters() if self.remote and self.cache_dir else None
        self._fs = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"], state["_pid"] = None, None
        return state

    @property
    def cached(self) -> bool:
        return self.counters is not None

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

    @property
    def cache_root(self) -> str:
        return os.path.join(self.cache_dir, self.identity)

    def local_path(self, rel: str) -> str:
        if not self.remote:
            return os.path.join(self.root, rel)
        if not self.cached:
            raise LoadbenchError(
                f"{join(self.root, rel)} must be read from a local file; pass --cache-dir DIR "
                "(or storage.cache_dir in an experiment) to read the store through a local copy"
            )
        return self._fetch(rel)

    def _fetch(self, rel: str) -> str:
        """The local copy of `rel`, copied whole on first use (atomically: a worker never
        sees half a file, and two workers asking at once download it once)."""
        import fcntl

        dest = os.path.join(self.cache_root, rel)
        expected = self.sizes.get(rel)
        if self._valid(dest, expected):
            self.counters.add(True, os.path.getsize(dest))
            return dest
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._valid(dest, expected):  # another process fetched it meanwhile
                self.counters.add(True, os.path.getsize(dest))
                return dest
            tmp = f"{dest}.part-{os.getpid()}"
            try:
                with self.errors():
                    self.fs.get_file(self.remote_path(rel), tmp)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        self.counters.add(False, os.path.getsize(dest))
        return dest

    def local_paths(self, rels: list[str]) -> list[str]:
        """`local_path` of many files; the ones not in the read-through cache yet are fetched
        concurrently (each into a name of its own, then renamed: atomic without a lock)."""
        if not self.remote or not self.cached:
            return [self.local_path(rel) for rel in rels]
        dests = [os.path.join(self.cache_root, rel) for rel in rels]
        missing = [i for i, d in enumerate(dests) if not self._valid(d, self.sizes.get(rels[i]))]
        absent = set(missing)
        for i, dest in enumerate(dests):
            if i not in absent:
                self.counters.add(True, os.path.getsize(dest))
        if not missing:
            return dests
        tmps = [f"{dests[i]}.part-{os.getpid()}" for i in missing]
        for tmp in tmps:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
        try:
            with self.errors():
                self.fs.get([self.remote_path(rels[i]) for i in missing], tmps)
            for i, tmp in zip(missing, tmps, strict=True):
                os.replace(tmp, dests[i])
                self.counters.add(False, os.path.getsize(dests[i]))
        finally:
            for tmp in tmps:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        return dests

    @staticmethod
    def _valid(path: str, expected: int | None) -> bool:
        try:
            size = os.path.getsize(path)
        except OSError:
            return False
        return expected is None or size == expected

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
        """Byte ranges [start, stop) of files, fetched concurrently from object storage."""
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

    def open(self, rel: str, block_size: int = 4 << 20):
        """A seekable binary file object (h5py reads remote HDF5 through one)."""
        if self.has_local_files:
            return open(self.local_path(rel), "rb")
        with self.errors():
            return self.fs.open(
                self.remote_path(rel), "rb", block_size=block_size, cache_type="blockcache"
            )

    def zarr_store(self, rel: str):
        """A read-only zarr store of the directory `rel`."""
        from zarr.storage import FsspecStore, LocalStore

        if not self.remote:
            return LocalStore(os.path.join(self.root, rel), read_only=True)
        if not self.cached:  # zarr makes its own asynchronous filesystem
            with self.errors():
                return FsspecStore.from_url(
                    join(self.root, rel), storage_options=self.options, read_only=True
                )
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(_CacheFileSystem(self), asynchronous=True)
        return FsspecStore(fs, read_only=True, path=rel)

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


def _cache_filesystem_class():
    from fsspec import AbstractFileSystem

    class CacheFileSystem(AbstractFileSystem):
        """A read-only fsspec view of a store through its read-through cache (for zarr):
        paths are relative to the store's root; a missing object is FileNotFoundError."""

        protocol = "loadbench-cache"
        cachable = False

        def __init__(self, files: StoreFiles):
            super().__init__()
            self.files = files

        def _open(self, path, mode="rb", **kwargs):
            if mode != "rb":
                raise PermissionError("read-only")
            try:
                return open(self.files.local_path(path.lstrip("/")), "rb")
            except LoadbenchError as e:
                if "not found" in str(e):
                    raise FileNotFoundError(path) from None
                raise

        def info(self, path, **kwargs):
            with self.files.errors():
                info = self.files.fs.info(self.files.remote_path(path.lstrip("/")))
            return {**info, "name": path}

        def ls(self, path, detail=True, **kwargs):
            base = self.files.remote_path("").rstrip("/")
            with self.files.errors():
                found = self.files.fs.ls(self.files.remote_path(path.lstrip("/")), detail=True)
            out = [{**f, "name": f["name"][len(base) + 1 :]} for f in found]
            return out if detail else [f["name"] for f in out]

    return CacheFileSystem


def _CacheFileSystem(files: StoreFiles):  # noqa: N802 (a class made on first use)
    global _CACHE_FS
    if _CACHE_FS is None:
        _CACHE_FS = _cache_filesystem_class()
    return _CACHE_FS(files)


_CACHE_FS = None


class RangeArray:
    """A `.npy` array on object storage, indexed like a memory map: `a[i]`, `a[lo:hi]` and
    `a[sorted_indices]` read only the bytes of those rows (contiguous runs in one request each,
    all runs of a call fetched concurrently)."""

    def __init__(self, files: StoreFiles, rel: str):
        self.files, self.rel = files, rel
        head = files.read_ranges([rel], [0], [4096])[0]
        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{rel} is in Fortran order")
        self.shape, self.dtype, self.offset = tuple(shape), np.dtype(dtype), f.tell()
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, runs: list[tuple[int, int]]) -> np.ndarray:
        starts = [self.offset + lo * self.row_bytes for lo, _ in runs]
        stops = [self.offset + hi * self.row_bytes for _, hi in runs]
        data = self.files.read_ranges([self.rel] * len(runs), starts, stops)
        if any(len(d) != b - a for d, a, b in zip(data, starts, stops, strict=True)):
            raise OSError(f"{self.rel} is shorter than its header says")
        joined = b"".join(data)
        return np.frombuffer(joined, dtype=self.dtype).reshape(-1, *self.row_shape).copy()

    def __getitem__(self, key):
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                raise IndexError("RangeArray slices have step 1")
            return self._rows([(lo, hi)]) if hi > lo else self._rows([])[:0]
        if np.isscalar(key):
            return self._rows([(int(key), int(key) + 1)])[0]
        indices = np.asarray(key, dtype=np.int64)
        if len(indices) == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(ordered, cuts)]
        rows = self._rows(runs)
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def __array__(self, dtype=None, copy=None):
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)
