"""Content checksums of a split: SHA-256 of its stored images and labels, whole and per block.

Taken at conversion time of what a reader will decode, and again by `verify` of what the reader
does decode; block hashes say which images differ, not only that something does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def checksum_block(image_shape: tuple[int, int, int]) -> int:
    """Images per checksum block (and per conversion batch): about 64 MiB of uint8 pixels."""
    pixels = int(np.prod(image_shape))
    block = max(1, min(1024, (64 << 20) // pixels))
    return 1 << (block.bit_length() - 1)  # a power of two, so chunk sizes divide it


class ContentHash:
    """SHA-256 of a split's images and labels, whole and per block of `block` images.

    Block hashes let `verify` say which images differ, not only that something does.
    """

    def __init__(self, block: int):
        self.block = block
        self.images = hashlib.sha256()
        self.labels = hashlib.sha256()
        self.blocks: list[str] = []
        self._block_images = hashlib.sha256()
        self._block_labels = hashlib.sha256()
        self._filled = 0

    def update(self, images: np.ndarray, labels: np.ndarray) -> None:
        pos = 0
        while pos < len(images):
            take = min(self.block - self._filled, len(images) - pos)
            pixels = _le_bytes(images[pos : pos + take])
            tags = _le_bytes(np.asarray(labels[pos : pos + take], dtype=np.int64))
            for hasher, data in (
                (self.images, pixels), (self._block_images, pixels),
                (self.labels, tags), (self._block_labels, tags),
            ):  # fmt: skip
                hasher.update(data)
            self._filled += take
            pos += take
            if self._filled == self.block:
                self._close_block()

    def _close_block(self) -> None:
        both = self._block_images.digest() + self._block_labels.digest()
        self.blocks.append(hashlib.sha256(both).hexdigest()[:16])
        self._block_images, self._block_labels = hashlib.sha256(), hashlib.sha256()
        self._filled = 0

    def finish(self) -> dict[str, Any]:
        if self._filled:
            self._close_block()
        return {
            "images_sha256": self.images.hexdigest(),
            "labels_sha256": self.labels.hexdigest(),
            "block_sha256": self.blocks,
        }


def _le_bytes(array: np.ndarray) -> memoryview:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(array).cast("B")
