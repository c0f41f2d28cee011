"""`npy` — NumPy arrays on disk, read through a memory map (`np.load(mmap_mode="r")`).

One `.npy` per split for images (N, H, W, C) and one for labels. Pages are read from disk (or the
page cache) only when touched; a batch is one fancy-indexing call on sorted indices.
"""

from __future__ import annotations

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


class NpyWriter(SplitWriter):
    def __init__(self, layout: SplitLayout):
        base = os.path.join(layout.root, layout.split)
        self.images = np.lib.format.open_memmap(
            base + "_images.npy", mode="w+", dtype=DTYPES[layout.dtype],
            shape=(layout.count, *layout.image_shape),
        )  # fmt: skip
        self.labels = np.lib.format.open_memmap(
            base + "_labels.npy", mode="w+", dtype=np.int64, shape=(layout.count,)
        )
        self.pos = 0

    def write(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        n = len(images)
        self.images[self.pos : self.pos + n] = images
        self.labels[self.pos : self.pos + n] = labels
        self.pos += n
        return images

    def close(self) -> dict:
        self.images.flush()
        self.labels.flush()
        # Drop the maps now: pages a live mapping holds cannot be evicted for cold-cache runs.
        del self.images, self.labels
        return {}


class NpyReader(SplitReader):
    def _open(self):
        base = os.path.join(self.root, self.split)
        try:
            images = np.load(base + "_images.npy", mmap_mode="r")
            labels = np.load(base + "_labels.npy", mmap_mode="r")
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
