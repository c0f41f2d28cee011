"""`npy` — NumPy arrays on disk, read through a memory map (`np.load(mmap_mode="r")`).

One `.npy` per split for images (N, H, W, C) and one for labels. Pages are read from disk (or the
page cache) only when touched; a batch is one fancy-indexing call on sorted indices.
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.errors import reserve
from loadbench.formats.base import Format, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.formats.pixels import DTYPES
from loadbench.storefiles import NPY_ERRORS, NPY_HEAD, npy_header


class NpyWriter(SplitWriter):
    def __init__(self, layout: SplitLayout):
        # `prepare` made the files at their full size; writers of ranges write into them at once.
        images, labels = _paths(layout)
        self.images = np.lib.format.open_memmap(images, mode="r+")
        self.labels = np.lib.format.open_memmap(labels, mode="r+")
        self.pos = layout.start
        self.whole = layout.start == 0 and layout.end == layout.count

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int:
        return 1

    @classmethod
    def prepare(cls, layout: SplitLayout) -> None:
        images, labels = _paths(layout)
        shape = (layout.count, *layout.image_shape)
        np.lib.format.open_memmap(images, mode="w+", dtype=DTYPES[layout.dtype], shape=shape)
        np.lib.format.open_memmap(labels, mode="w+", dtype=np.int64, shape=(layout.count,))
        reserve([images, labels], "converting into")  # a full disk: an error, not a SIGBUS

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        if len(parts) > 1:  # ranges left their pages dirty (see `close`): written back at once
            for path in _paths(layout):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return {}

    def write(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        n = len(images)
        self.images[self.pos : self.pos + n] = images
        self.labels[self.pos : self.pos + n] = labels
        self.pos += n
        return images

    def close(self) -> dict:
        # Written back now, so that no dirty page outlives the store's making (dirty pages
        # cannot be evicted for cold-cache runs). Writers of ranges leave that to `join`: ranges
        # written back one by one scatter the file in pieces over the disk, a different size
        # on disk from one writer's (an extent block) and slower reads.
        if self.whole:
            self.images.flush()
            self.labels.flush()
        # Drop the maps now: pages a live mapping holds cannot be evicted for cold-cache runs.
        del self.images, self.labels
        return {}


def _paths(layout: SplitLayout) -> tuple[str, str]:
    base = os.path.join(layout.root, layout.split)
    return base + "_images.npy", base + "_labels.npy"


class NpyReader(SplitReader):
    def _open(self):
        files = self.files
        names = f"{self.split}_images.npy", f"{self.split}_labels.npy"
        arrays = []
        for name in names:
            try:
                files.check_npy(name)  # a damaged header must not size the map or a read
                if files.has_local_files:  # a memory map of the file or of its cached copy
                    arrays.append(np.load(files.local_path(name), mmap_mode="r"))
                elif name == names[0]:  # object storage: rows read by byte ranges
                    arrays.append(RangeArray(files, name))
                else:
                    arrays.append(files.read_npy(name))
            except NPY_ERRORS as e:
                raise self._damaged(f"{name} cannot be mapped", e) from None
        images, labels = arrays
        fortran = hasattr(images, "flags") and not images.flags.c_contiguous  # (RangeArray: C)
        check_arrays(
            self, names, (images.shape, images.dtype, fortran), (labels.shape, labels.dtype, False)
        )
        return {"images": images, "labels": labels}

    def labels(self) -> np.ndarray:
        return np.array(self.handle["labels"], dtype=np.int64)

    def read(self, index: int):
        h = self.handle
        index = self._check_index(index)
        return np.array(h["images"][index]), int(h["labels"][index])

    def read_items(self, indices: np.ndarray):
        h = self.handle
        if len(indices) and indices[-1] - indices[0] + 1 == len(indices):
            lo, hi = int(indices[0]), int(indices[-1]) + 1  # contiguous: a slice, one copy
            return np.array(h["images"][lo:hi]), np.array(h["labels"][lo:hi])
        return h["images"][indices], h["labels"][indices]

    def read_batch(self, indices):
        indices = self.check_indices(indices)
        out = self._empty(len(indices))
        return out, self.read_batch_into(indices, out)

    def read_batch_into(self, indices, out):
        """One gather from the memory map, in the order asked, straight into `out`: sorting
        first (`SplitReader.read_batch`) costs a sort and a second copy, and page-cache reads
        of a map gain nothing from order."""
        h = self.handle
        images, labels = h["images"], h["labels"]
        if not isinstance(images, np.ndarray):  # object storage (`RangeArray`): sorted runs
            out[...], labels = SplitReader.read_batch(self, indices)
            return labels
        # "clip" never clips checked indices, and writes `out` without the buffer that "raise"
        # makes (a second copy of the batch).
        np.take(images.view(np.ndarray), indices, axis=0, out=out, mode="clip")
        return np.take(labels.view(np.ndarray), indices, mode="clip").astype(np.int64, copy=False)

    def close(self) -> None:
        self._handle = None  # memmaps unmap when the last reference goes


def check_arrays(reader: SplitReader, names: tuple[str, str], images: tuple, labels: tuple):
    """The damaged-store error unless the split's images, (shape, dtype, fortran order) from
    their header, are (count, *image_shape) in the store's dtype and C order, and its labels
    `count` int64s: a flipped bit in a header can call the same bytes another dtype."""
    shape, dtype, fortran = images
    want = (reader.count, *reader.image_shape)
    if tuple(shape) != want or dtype != DTYPES[reader.dtype] or fortran:
        order = " in Fortran order" if fortran else ""
        raise reader._damaged(
            names[0], f"holds {tuple(shape)} {dtype}{order}, not {want} {reader.dtype}"
        )
    shape, dtype, fortran = labels
    if tuple(shape) != (reader.count,) or dtype != np.int64:
        raise reader._damaged(names[1], f"holds {tuple(shape)} {dtype}, not {reader.count} int64")


class RangeArray:
    """A `.npy` array on object storage, indexed like a memory map: `a[i]`, `a[lo:hi]` and
    `a[sorted_indices]` read only the bytes of those rows (contiguous runs in one request each,
    all runs of a call fetched concurrently)."""

    def __init__(self, files, rel: str):
        self.files, self.rel = files, rel
        head = files.read_ranges([rel], [0], [NPY_HEAD])[0]
        shape, dtype, fortran, offset = npy_header(head, rel)
        if fortran:
            raise ValueError(f"{rel} is in Fortran order")
        self.shape, self.dtype, self.offset = shape, np.dtype(dtype), offset
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


@register_format
class NpyFormat(Format):
    name = "npy"
    summary = "NumPy .npy arrays read through a memory map"
    writer_class = NpyWriter
    reader_class = NpyReader
