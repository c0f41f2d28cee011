"""`npy` — NumPy arrays on disk, read through a memory map (`np.load(mmap_mode="r")`).

One `.npy` per split for images (N, H, W, C) and one for labels. Pages are read from disk (or the
page cache) only when touched; a batch is one fancy-indexing call on sorted indices.
"""

from __future__ import annotations

import io
import os

import numpy as np

from loadbench.formats.base import (
    DTYPES,
    Format,
    SplitLayout,
    SplitReader,
    SplitWriter,
    register_format,
)
from loadbench.remote import RangeArray


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
        try:
            if files.has_local_files:  # a memory map of the file or of its cached copy
                images, labels = (np.load(files.local_path(n), mmap_mode="r") for n in names)
            else:  # object storage: rows read by byte ranges
                images = RangeArray(files, names[0])
                labels = np.load(io.BytesIO(files.read(names[1])))
        except (OSError, ValueError) as e:
            raise self._damaged(f"{self.split} arrays cannot be mapped", e) from None
        if images.shape != (self.count, *self.image_shape) or len(labels) != self.count:
            raise self._damaged(f"{self.split} arrays have shape {images.shape}", "wrong shape")
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

    def close(self) -> None:
        self._handle = None  # memmaps unmap when the last reference goes


@register_format
class NpyFormat(Format):
    name = "npy"
    summary = "NumPy .npy arrays read through a memory map"
    writer_class = NpyWriter
    reader_class = NpyReader
