"""A store on disk: one directory, one format, one dtype, a `manifest.json` that describes it.

`open_store(path)` checks the manifest and that every file it lists is present at its recorded
size, then hands out per-split readers, torch Datasets and batches as float32 tensors.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import numpy as np
import torch
import torch.utils.data
from pydantic import BaseModel, ConfigDict, ValidationError

from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.formats import ALL_NAMES, DTYPES, get_format
from loadbench.formats.base import SplitReader, to_tensor
from loadbench.remote import StoreFiles, is_url, join

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    count: int
    label_counts: list[int]
    images_sha256: str
    labels_sha256: str
    block_sha256: list[str]


class Manifest(BaseModel):
    """Everything needed to read a store back and to know what is in it."""

    model_config = ConfigDict(extra="allow")

    loadbench_store: int  # schema version of this manifest
    format: str
    format_version: int
    dtype: str
    image_shape: tuple[int, int, int]
    classes: list[str]
    splits: dict[str, SplitInfo]
    options: dict[str, Any]
    lossy: bool
    checksum_block: int  # images per block hash in `block_sha256`
    identity: str  # hash of (source, format, dtype, options): same identity, same store
    source: dict[str, Any]
    files: dict[str, int]  # relative path -> size in bytes, checked on open
    bytes: int  # total size of the store's files
    bytes_allocated: int  # what the filesystem allocates for them (blocks)
    convert_time_s: float  # time spent in the format's writer (encode, write, pack)
    total_time_s: float  # the whole conversion: reading the source, dtype, checksums, writing
    created: str
    loadbench_version: str


def read_manifest(path: str) -> Manifest:
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise LoadbenchError(f"no store at {path}: not a directory")
    if not os.path.isfile(file):
        stores = find_stores(path)
        if stores:
            names = ", ".join(os.path.relpath(s, path) for s in stores[:5])
            more = ", ..." if len(stores) > 5 else ""
            raise LoadbenchError(
                f"{path} is a folder of {len(stores)} stores ({names}{more}); open one of them"
            )
        raise LoadbenchError(
            f"{path} is not a loadbench store: it has no {MANIFEST}; create one with "
            f"`loadbench convert SOURCE --format FORMAT --out {path}`"
        )
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStoreError(
            f"{file} is not readable JSON ({e}); convert the store again"
        ) from None
    return parse_manifest(data, file)


def parse_manifest(data: Any, file: str) -> Manifest:
    """The manifest in `data` (JSON already parsed), checked; `file` names it in errors."""
    if not isinstance(data, dict) or "loadbench_store" not in data:
        raise LoadbenchError(
            f"{file} was not written by loadbench (no 'loadbench_store' key); "
            "point at a store made by `loadbench convert`"
        )
    if data["loadbench_store"] != SCHEMA_VERSION:
        raise LoadbenchError(
            f"{file} has store schema {data['loadbench_store']}, this loadbench reads "
            f"{SCHEMA_VERSION}; convert the store again with this version"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise CorruptStoreError(f"{file} is damaged: {where}: {first['msg']}") from None
    if manifest.format not in ALL_NAMES:
        raise LoadbenchError(f"{file} names unknown format {manifest.format!r}")
    if manifest.dtype not in DTYPES:
        raise CorruptStoreError(f"{file} names unknown dtype {manifest.dtype!r}")
    return manifest


def find_stores(path: str) -> list[str]:
    """Stores directly inside `path` (one level down), sorted by name."""
    if not os.path.isdir(path):
        return []
    found = [
        e.path
        for e in os.scandir(path)
        if e.is_dir() and os.path.isfile(os.path.join(e.path, MANIFEST))
    ]
    return sorted(found)


def find_remote_stores(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """`url` when it is a store, else the stores directly under it (URLs, sorted)."""
    files = StoreFiles(url, storage_options)
    with files.errors():
        fs = files.fs
        if fs.exists(files.remote_path(MANIFEST)):
            return [files.root]
        base = files.remote_path("").rstrip("/")
        found = fs.glob(f"{base}/*/{MANIFEST}")
    protocol = url.partition("://")[0]
    return sorted(f"{protocol}://{p[: -len(MANIFEST) - 1]}" for p in found)


def check_files(path: str, manifest: Manifest) -> None:
    """Every file the manifest lists exists with the recorded size (catches truncation)."""
    for rel, size in manifest.files.items():
        file = os.path.join(path, rel)
        try:
            actual = os.path.getsize(file)
        except OSError:
            raise CorruptStoreError(
                f"store {path} is damaged: {rel} is missing; convert the store again"
            ) from None
        if actual != size:
            raise CorruptStoreError(
                f"store {path} is damaged: {rel} is {actual} bytes, the manifest says {size}; "
                "convert the store again"
            )


def has_remote_manifest(files: StoreFiles) -> bool:
    """Whether a manifest is at the store's URL; a missing bucket is an error. The bucket is
    asked about only without a manifest: credentials may read objects without seeing buckets."""
    with files.errors():
        fs = files.fs
        if fs.exists(files.remote_path(MANIFEST)):
            return True
        bucket = files.remote_path("").strip("/").split("/")[0]
        if not fs.exists(bucket):
            raise LoadbenchError(
                f"{files.root}: bucket {bucket!r} does not exist (or is not visible with "
                "these credentials); create it or check the URL"
            )
    return False


def read_remote_manifest(files: StoreFiles) -> Manifest:
    """The manifest of a store on object storage (always read from there, never cached)."""
    url = join(files.root, MANIFEST)
    if not has_remote_manifest(files):
        raise LoadbenchError(
            f"{files.root} is not a loadbench store: it has no {MANIFEST}; create one with "
            f"`loadbench convert SOURCE --format FORMAT --out {files.root}`"
        )
    with files.errors():
        raw = files.fs.cat_file(files.remote_path(MANIFEST))
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStoreError(
            f"{url} is not readable JSON ({e}); convert the store again"
        ) from None
    return parse_manifest(data, url)


def check_remote_files(files: StoreFiles, manifest: Manifest) -> None:
    """Every file the manifest lists exists on object storage with the recorded size."""
    base = files.remote_path("").rstrip("/")
    with files.errors():
        found = files.fs.find(base, detail=True)
    sizes = {name[len(base) + 1 :]: info.get("size") for name, info in found.items()}
    for rel, size in manifest.files.items():
        if rel not in sizes:
            raise CorruptStoreError(
                f"store {files.root} is damaged: {rel} is missing; convert the store again"
            )
        if sizes[rel] != size:
            raise CorruptStoreError(
                f"store {files.root} is damaged: {rel} is {sizes[rel]} bytes, the manifest "
                f"says {size}; convert the store again"
            )


class Store:
    """An opened store. `dataset(split)` is a torch Dataset; `read_batch` is the batch fast path."""

    def __init__(
        self, path: str, manifest: Manifest, device: str | None = None,
        files: StoreFiles | None = None,
    ):  # fmt: skip
        self.path = path
        # Where the files are: this directory, or object storage (+ a read-through cache).
        self.files = files if files is not None else StoreFiles(path)
        self.manifest = manifest
        self.device = device  # where device-resident formats (tensor) load; None = auto
        self.format = get_format(manifest.format)
        self.format_name = manifest.format
        self.classes: list[str] = manifest.classes
        self.counts = {split: info.count for split, info in manifest.splits.items()}
        self.dtype: str = manifest.dtype
        self.image_shape: tuple[int, int, int] = tuple(manifest.image_shape)
        self._readers: dict[str, SplitReader] = {}
        self.skipped = False  # set by convert when an identical store already existed
        self.chunk_cache_bytes: int | None = None  # None: the readers' default

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    def _check_split(self, split: str) -> None:
        if split not in self.counts:
            raise LoadbenchError(
                f"store {self.path} has no split {split!r}; it has {', '.join(self.splits)}"
            )

    def raw(self, split: str) -> SplitReader:
        """The split's reader: stored pixels (H, W, C) in the storage dtype, for verification."""
        self._check_split(split)
        if split not in self._readers:
            self._readers[split] = self.new_reader(split)
        return self._readers[split]

    def new_reader(self, split: str) -> SplitReader:
        """A reader of its own (for a DataLoader), not the one `raw` shares."""
        self._check_split(split)
        if missing := self.format.missing():
            raise LoadbenchError(f"cannot read {self.path}: {missing}")
        reader = self.format.reader(self.path, self.manifest, split)
        reader.device = self.device
        reader.files = self.files
        if self.chunk_cache_bytes is not None and hasattr(reader, "cache_bytes"):
            reader.cache_bytes = self.chunk_cache_bytes
        return reader

    def dataset(self, split: str, transform=None) -> StoreDataset:
        """A map-style torch Dataset of (float32 tensor C,H,W in [0, 1], int label)."""
        self._check_split(split)
        return StoreDataset(self.new_reader(split), self.classes, transform)

    def read_batch(self, split: str, indices) -> tuple[Any, Any]:
        """(float32 tensor N,C,H,W in [0, 1], int64 tensor N) for `indices`, in one call."""
        return self.raw(split).read_batch_tensor(indices)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={n}" for s, n in self.counts.items())
        return f"{type(self).__name__}({self.path!r}, {self.format_name}, {self.dtype}, {counts})"

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


class StoreDataset(torch.utils.data.Dataset):
    """A map-style Dataset over one split: (float32 tensor C,H,W in [0, 1], int label).

    Safe with DataLoader workers: the reader opens its files lazily in each worker process.
    """

    def __init__(self, reader: SplitReader, classes: list[str], transform=None):
        self.reader = reader
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        image, label = self.reader.read(index)
        tensor = to_tensor(image)
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, label


class ArrayReader(SplitReader):
    """A split held in memory as uint8 arrays: the reader of a source opened for training."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, split: str):
        self.root = "<memory>"
        self.split = split
        self.count = len(labels)
        self.image_shape = tuple(images.shape[1:])
        self.dtype = "uint8"
        self.options = {}
        self._handle = self._pid = None
        self.images, self.label_array = images, labels

    def labels(self) -> np.ndarray:
        return self.label_array

    def read_items(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.label_array[indices]


class MemoryStore(Store):
    """A source decoded into memory and used like a store (`loadbench train SOURCE`)."""

    def __init__(self, source):
        from loadbench import progress

        with progress.task(f"reading {source.spec}", len(source.splits)) as advance:
            self.arrays = {}
            for split in source.splits:
                self.arrays[split] = source.split(split)
                advance(1)
        self.path = f"<memory:{source.spec}>"
        self.files = StoreFiles(self.path)
        self.manifest = None
        self.device = None
        self.format = None
        self.format_name = "memory"
        self.source = source
        self.classes = list(source.classes)
        self.counts = {split: source.count(split) for split in source.splits}
        self.dtype = "uint8"
        self.image_shape = tuple(source.image_shape)
        self._readers = {}
        self.skipped = False
        self.chunk_cache_bytes = None

    def new_reader(self, split: str) -> SplitReader:
        return ArrayReader(*self.arrays[split], split)


def open_data(spec_or_path: str, device: str | None = None, cache_dir: str | None = None) -> Store:
    """A store directory or URL opened with `open_store`, or else a source spec held in
    memory."""
    from loadbench.sources import load_source

    if is_url(str(spec_or_path)):
        return open_store(str(spec_or_path), device, cache_dir=cache_dir)
    path = os.path.expanduser(str(spec_or_path))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
        return open_store(path, device)
    if os.path.isdir(path) and find_stores(path):
        read_manifest(path)  # raises the "folder of stores" error
    return MemoryStore(load_source(str(spec_or_path)))


def open_store(
    path: str,
    device: str | None = None,
    *,
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Store:
    """Open a store written by `loadbench convert`, after checking its manifest and files.

    `path` is a directory or an fsspec URL (`s3://bucket/prefix/store`); a remote store is read
    in place, or through a local read-through copy under `cache_dir` when given. Credentials
    and the endpoint come from the environment (AWS_*) or `storage_options`. `device` is where
    device-resident formats (`tensor`) load: "cuda", "cpu", or None for CUDA when available.
    """
    if is_url(str(path)):
        return _open_remote(str(path), device, cache_dir, storage_options or {})
    path = os.path.abspath(os.path.expanduser(str(path)))
    manifest = read_manifest(path)
    _check_version(path, manifest)
    check_files(path, manifest)
    return Store(path, manifest, device)


def _check_version(path: str, manifest: Manifest) -> None:
    fmt = get_format(manifest.format)
    if manifest.format_version != fmt.version:
        raise LoadbenchError(
            f"store {path} has {manifest.format} layout version {manifest.format_version}, this "
            f"loadbench reads version {fmt.version}; convert the store again"
        )


def _open_remote(url: str, device, cache_dir, options) -> Store:
    files = StoreFiles(url, options)  # the manifest says which cache the store's files use
    manifest = read_remote_manifest(files)
    _check_version(url, manifest)
    if get_format(manifest.format).peer:
        raise LoadbenchError(
            f"{url}: {manifest.format} is a peer loader, which reads local stores only"
        )
    check_remote_files(files, manifest)
    files = StoreFiles(url, options, cache_dir, manifest.identity, manifest.files)
    return Store(files.root, manifest, device, files)


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
