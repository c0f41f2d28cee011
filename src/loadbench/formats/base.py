"""The contract every storage format fulfils: a writer per split and a reader per split.

A format is one module with a `Format` subclass registered by `@register_format`.
Writers receive batches in split order, already in the storage dtype; readers give back stored
pixels (H, W, C) in the storage dtype, one at a time (`read`) or a batch per call (`read_batch`,
the fast path). Readers open files lazily in the process that uses them, so they can be sent to
DataLoader workers (h5py and LMDB handles must not cross a fork) and pickled for spawn.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from loadbench import stages
from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.formats.pixels import DTYPES, to_tensor
from loadbench.options import Option
from loadbench.storefiles import NPY_ERRORS, StoreFiles


@dataclass
class SplitLayout:
    """What a writer needs to know about the split it writes."""

    root: str
    split: str
    count: int
    image_shape: tuple[int, int, int]
    dtype: str
    options: dict[str, Any]
    classes: list[str] = field(default_factory=list)
    # The images [start, stop) of the split that this writer writes: the whole split unless
    # the split is written by several writers at once (see `SplitWriter.range_unit`).
    start: int = 0
    stop: int | None = None
    # Threads a writer may use for encoding; None: its own choice. Writers running in parallel
    # processes get their share of the cores.
    threads: int | None = None

    @property
    def end(self) -> int:
        return self.count if self.stop is None else self.stop


class SplitWriter:
    """Receives its images of a split in order, batch after batch; `close` returns what the
    writer's class `join`s into the split's manifest extras.

    A writer whose layout lets several writers each write a range of whole units (a shard, a
    chunk, an image file) at once says so with `range_unit`; `convert --jobs N` then runs them
    in separate processes: `prepare` once, a writer per range, `join` of their `close()` results
    in split order. One writer for the whole split goes through the same three steps.
    """

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int | None:
        """Images per unit that ranges must be made of; None: the split needs one writer."""
        return None

    @classmethod
    def prepare(cls, layout: SplitLayout) -> None:
        """Create what the writers of a split share (files they all write into)."""

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The split's manifest extras from its writers' `close()` results, in split order."""
        if len(parts) != 1:
            raise LoadbenchError(f"{cls.__name__} writes a split with one writer only")
        return parts[0]

    def write(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Store a batch; return the images exactly as a reader will give them back."""
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        """Let go of open files after a failed `write` or `close` (a full disk, Ctrl-C) without
        finishing them, and without raising: the partial store is removed next. A writer whose
        library would otherwise fail again later (in a finalizer, at exit) must override it."""


class SplitReader:
    """Random access to one split of a store, in the storage dtype and (H, W, C) layout.

    Subclasses implement `_open` (returns the per-process handle) and `read_items` (sorted,
    unique indices); `read_batch` takes any order and repetitions.
    """

    device: str | None = None  # only device-resident readers use it
    # Images per storage block (chunk) when the format reads whole blocks, for `shuffle:
    # block`; None: no such blocks.
    block_images: int | None = None

    def __init__(self, root: str, manifest: Any, split: str):
        self.root = root
        # Reads the store's files by relative path; the store replaces it for remote stores.
        self.files = StoreFiles(root)
        self.split = split
        self.count = manifest.splits[split].count
        self.image_shape = tuple(manifest.image_shape)
        self.dtype = manifest.dtype
        self.options = manifest.options
        self._handle: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.count

    # -- per-process handles ------------------------------------------------------------
    def _open(self) -> Any:
        """Open the files this reader needs (called once per process, on first use)."""
        return None

    @property
    def handle(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open()
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and self._pid == os.getpid():
            _close(handle)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        state.pop("_buffers", None)  # `_staging`'s, for the threads of this process
        return state

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    # -- reading --------------------------------------------------------------------------
    def read_items(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, H, W, C) and labels (n,) for sorted, unique, in-range indices."""
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """Every label of the split, in order. Formats that keep labels apart from the images
        override this so that it reads no image."""
        labels = np.empty(self.count, dtype=np.int64)
        for start, _, block_labels in self.iter_blocks(1024):
            labels[start : start + len(block_labels)] = block_labels
        return labels

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """One image (H, W, C) in the storage dtype and its label."""
        index = self._check_index(index)
        images, labels = self.read_items(np.array([index], dtype=np.int64))
        return images[0], int(labels[0])

    def read_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, H, W, C) and labels (n,) in the order of `indices`, in one call.

        Reads happen in sorted order (sequential on disk, each chunk once), then the batch is
        put back into the order asked for.
        """
        indices = self.check_indices(indices)
        unique, inverse = np.unique(indices, return_inverse=True)
        images, labels = self.read_items(unique)
        if len(unique) == len(indices) and np.array_equal(unique, indices):
            return images, labels
        return images[inverse], labels[inverse]

    def check_indices(self, indices) -> np.ndarray:
        """Indices as int64 in 0..count-1 (negative ones count from the end); IndexError else."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < -self.count or indices.max() >= self.count):
            bad = indices[(indices < -self.count) | (indices >= self.count)][0]
            raise IndexError(f"index {bad} out of range for split {self.split!r} of {self.count}")
        return np.where(indices < 0, indices + self.count, indices)

    def loader(self, order, *, access: str, batch_size: int, workers: int, pin_memory: bool,
               augmenter):  # fmt: skip
        """An iterable of (float32 images N,C,H,W in [0, 1], int64 labels N) over
        `order.draw()` of each epoch, for readers that bring their own pipeline (peer loaders);
        None means loadbench's DataLoader path (`training.batches.make_batches`)."""
        return None

    def resident(self, device):
        """The whole split as (stored images N,H,W,C, labels N) tensors on `device`, for
        `device` access: read once here, then it lives there. Readers that load themselves
        onto a device (the tensor format) override this."""
        import torch

        images, labels = self.read_items(np.arange(self.count, dtype=np.int64))
        return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)

    def read_batch_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The images of `indices` (checked, any order) written into `out` (n, H, W, C) in the
        storage dtype; returns their labels. Formats that can write a batch in place (decode
        into it, gather into it) override this; by default a `read_batch` copied in."""
        images, labels = self.read_batch(indices)
        out[...] = images
        return labels

    def read_batch_tensor(self, indices, out=None):
        """(float32 tensor N,C,H,W in [0, 1], int64 tensor N): the batch ready for a model.

        Each call returns new tensors, or writes the images into `out` (a float32 tensor of the
        batch's shape) when given. Formats that write in place (`read_batch_into`) gather into
        a buffer this reader keeps for the thread calling it, so that the stored pixels of a
        batch are written once and converted once. Outside DataLoader workers, the conversion
        uses every core, as torch's own conversion would."""
        import torch

        indices = self.check_indices(indices)
        if type(self).read_batch_into is SplitReader.read_batch_into:
            images, labels = self.read_batch(indices)
        else:
            images = self._staging(len(indices))
            labels = self.read_batch_into(indices, images)
        stages.lap(stages.READ)  # a loader's read ends here; the conversion is its collate
        threads = (os.cpu_count() or 1) if torch.utils.data.get_worker_info() is None else 1
        images = to_tensor(images, out=out, threads=threads)  # a worker converts in one part
        return images, torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def _staging(self, n: int) -> np.ndarray:
        """This thread's reused array of `n` stored images (grown when a batch is larger)."""
        local = self.__dict__.get("_buffers")
        if local is None:
            local = self.__dict__.setdefault("_buffers", threading.local())
        buffer = getattr(local, "images", None)
        if buffer is None or len(buffer) < n:
            local.images = buffer = self._empty(n)
        return buffer[:n]

    def iter_blocks(self, block: int):
        """(start, images, labels) over the whole split in order, `block` images at a time."""
        for start in range(0, self.count, block):
            stop = min(start + block, self.count)
            images, labels = self.read_items(np.arange(start, stop, dtype=np.int64))
            yield start, images, labels

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"index out of range for split {self.split!r} of {self.count}")
        return index

    def _empty(self, n: int) -> np.ndarray:
        return np.empty((n, *self.image_shape), dtype=DTYPES[self.dtype])

    def _read_npy(self, rel: str) -> np.ndarray:
        """A whole `.npy` file of the store (its header checked first), or the damaged-store
        error naming it."""
        try:
            return self.files.read_npy(rel)
        except NPY_ERRORS as e:
            raise self._damaged(rel, e) from None

    def _read_json(self, rel: str) -> Any:
        """A JSON file of the store, or the damaged-store error naming it."""
        try:
            return json.loads(self.files.read(rel))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are both
            raise self._damaged(rel, e) from None

    def _damaged(self, what: str, error: Exception | str) -> CorruptStoreError:
        """The error for a damaged store: `what` names the file (its path in the store) and
        `error` says what is wrong with it, on one line whatever a library's message holds."""
        return CorruptStoreError(
            f"store {self.root} is damaged: {what}: {one_line(error)}; run `loadbench verify "
            f"{self.root}` and convert again"
        )


def _importable(module: str) -> bool:
    """Whether `module` is installed; a dotted name whose parent package is missing is not
    (`find_spec` raises for it instead of answering)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """A library's error message on one line (some span several, or quote whole files), cut at
    `limit` characters; the exception's type name when it has no message."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _close(handle: Any) -> None:
    items = (
        handle.values()
        if isinstance(handle, dict)
        else (handle if isinstance(handle, (list, tuple)) else [handle])
    )
    for item in items:
        closer = getattr(item, "close", None)
        if callable(closer):
            with contextlib.suppress(Exception):
                closer()


class Format:
    """A storage format: name, allowed dtypes, options, and its writer and reader classes."""

    name: ClassVar[str]
    summary: ClassVar[str]
    dtypes: ClassVar[tuple[str, ...]] = tuple(DTYPES)
    options: ClassVar[dict[str, Option]] = {}
    writer_class: ClassVar[type[SplitWriter]]
    reader_class: ClassVar[type[SplitReader]]
    # Formats of one file per image list only their index files in the manifest.
    tracks_every_file: ClassVar[bool] = True
    # Bumped when the on-disk layout changes; readers refuse stores of another version.
    version: ClassVar[int] = 1
    # Peer loaders are other projects' libraries (optional installs) run as their users run
    # them; they bring their own pipeline (`SplitReader.loader`) for the access modes they have.
    peer: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()  # modules that must import (pip names in `install`)
    install: ClassVar[str] = ""
    accesses: ClassVar[tuple[str, ...]] = ("sample", "batch", "threads", "device")
    own_order: ClassVar[bool] = False  # a peer that streams in its library's order, not ours
    reads_remote: ClassVar[bool] = False  # a peer whose library reads stores on object storage

    def missing(self) -> str | None:
        """Why this format cannot run here (a module it needs does not import), else None."""
        absent = [m for m in self.requires if not _importable(m)]
        if not absent:
            return None
        return (
            f"{self.name} needs {', '.join(absent)}, which is not installed: "
            f"pip install {self.install or 'loadbench[peers]'}"
        )

    def resolve_options(self, dtype: str, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, types coerced, unknown options and bad values rejected, and
        combinations the format cannot store with `dtype` refused."""
        if dtype not in DTYPES:
            raise LoadbenchError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if dtype not in self.dtypes:
            array_formats = ", ".join(f.name for f in REGISTRY.values() if dtype in f.dtypes)
            raise LoadbenchError(
                f"{self.name} stores {'/'.join(self.dtypes)} images only; use --dtype "
                f"{self.dtypes[0]} (float16/float32 are for array formats: {array_formats})"
            )
        resolved = self.parse_options(given)
        self.check(dtype, resolved)
        return resolved

    def parse_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every declared option: its default, or the value given, typed and checked."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise LoadbenchError(
                f"format {self.name} has no option {', '.join(unknown)} (its options: {known})"
            )
        return {key: self._parse(key, opt, given.get(key, opt.default))
                for key, opt in self.options.items()}  # fmt: skip

    def _parse(self, key: str, opt: Option, value: Any) -> Any:
        if value is not None and not isinstance(value, opt.kind):
            try:
                value = opt.kind(value)
            except (TypeError, ValueError):
                raise LoadbenchError(
                    f"{self.name} option {key}={value!r} is not a {opt.kind.__name__}"
                ) from None
        if opt.choices is not None and value not in opt.choices:
            raise LoadbenchError(
                f"{self.name} option {key}={value!r} is not one of "
                f"{', '.join(map(str, opt.choices))}"
            )
        if opt.minimum is not None and value is not None and value < opt.minimum:
            raise LoadbenchError(f"{self.name} option {key}={value} must be >= {opt.minimum}")
        return value

    def check(self, dtype: str, options: dict[str, Any]) -> None:
        """Combinations of dtype and options the format cannot store (override to add)."""

    def is_lossy(self, options: dict[str, Any]) -> bool:
        return False

    def needs_local_file(self, options: dict[str, Any]) -> bool:
        """Whether the reader maps or opens a real file, so that a store on object storage is
        read through a local copy (`cache_dir`) and cannot be read in place."""
        return False

    def writer(self, layout: SplitLayout) -> SplitWriter:
        return self.writer_class(layout)

    def finalize(self, root: str, options: dict[str, Any]) -> None:
        """Called once after every split is written (e.g. to pack a directory into a zip)."""

    def reader(self, root: str, manifest: Any, split: str) -> SplitReader:
        return self.reader_class(root, manifest, split)


# Every registered format by name. `loadbench.formats` imports the modules that declare formats
# and keeps this in their order.
REGISTRY: dict[str, Format] = {}


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: make a `Format` subclass known by its `name` (a module that declares
    formats is listed in `loadbench.formats.MODULES`; any other module may register one too)."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls()
    return cls
