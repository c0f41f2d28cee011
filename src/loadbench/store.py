"""A store: one directory (or object-storage prefix), one format, one dtype, and a
`manifest.json` that describes it.

`open_store(path)` checks the manifest and that every file it lists is present at its recorded
size, then hands out per-split readers, torch Datasets and batches as float32 tensors.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.utils.data

from loadbench.errors import LoadbenchError
from loadbench.formats import get_format
from loadbench.formats.base import SplitReader
from loadbench.formats.pixels import to_tensor
from loadbench.manifest import MANIFEST, Manifest, check_files, find_stores, read_manifest
from loadbench.remote import is_url
from loadbench.storefiles import StoreFiles


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

    def read_batch(self, split: str, indices, out=None) -> tuple[Any, Any]:
        """(float32 tensor N,C,H,W in [0, 1], int64 tensor N) for `indices`, in one call.

        Each call returns tensors of their own; with `out` (a float32 tensor of the batch's
        shape), the images are written into it instead, and it is returned."""
        reader = self.raw(split)
        if out is None:
            return reader.read_batch_tensor(indices)
        return reader.read_batch_tensor(indices, out=out)

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


def open_data(
    spec_or_path: str,
    device: str | None = None,
    cache_dir: str | None = None,
    source_options: dict[str, Any] | None = None,
    seed: int | None = None,
) -> Store:
    """A store directory or URL opened with `open_store`, or else a source spec held in
    memory, with `source_options` (and `seed`, unless the spec sets its own)."""
    from loadbench import progress
    from loadbench.sources import load_source, split_spec

    spec = str(spec_or_path)
    path = os.path.expanduser(spec)
    local_store = os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))
    is_store = is_url(spec) or local_store
    if is_store and source_options:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in source_options)
        raise LoadbenchError(
            f"{flags} apply to a source, and {spec} is a store (converted with its own): give "
            "them when converting, or train from the source"
        )
    if is_url(spec):
        return open_store(spec, device, cache_dir=cache_dir)
    if is_store:
        return open_store(path, device)
    if os.path.isdir(path) and find_stores(path):
        read_manifest(path)  # raises the "folder of stores" error
    options = dict(source_options or {})
    if seed is not None and "seed" not in split_spec(spec)[2]:
        options.setdefault("seed", seed)
    source = load_source(spec, **options)
    for note in source.notes:
        progress.note(note)
    return MemoryStore(source)


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
    path = str(path)
    root = path if is_url(path) else os.path.abspath(os.path.expanduser(path))
    files = StoreFiles(root, storage_options, cache_dir)
    manifest = read_manifest(files)
    fmt = get_format(manifest.format)
    if manifest.format_version != fmt.version:
        raise LoadbenchError(
            f"store {files.root} has {manifest.format} layout version {manifest.format_version},"
            f" this loadbench reads version {fmt.version}; convert the store again"
        )
    if files.remote and fmt.peer and not fmt.reads_remote:
        raise LoadbenchError(
            f"{files.root}: {manifest.format} is a peer loader, which reads local stores only"
        )
    check_files(files, manifest)
    files.use_cache(manifest.identity, manifest.files)
    return Store(files.root, manifest, device, files)
