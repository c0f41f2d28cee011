"""What a source kind reads from its published layout: raw splits (every label known, images
decoded on demand by index) and the dataset they make up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Images are handed around as uint8 arrays of shape (N, H, W, C): the layout of every source's
# published files and of PIL, so nothing is transposed until a batch becomes a tensor.
ImageShape = tuple[int, int, int]


class RawSplit:
    """One split as published: every label known, images decoded on demand."""

    labels: np.ndarray

    def load(self, indices: np.ndarray) -> np.ndarray:
        """Decode the images at `indices` (any order) into uint8 (n, H, W, C)."""
        raise NotImplementedError

    def original_sizes(self, indices: np.ndarray) -> OriginalSizes | None:
        """Width, height and file size of the images before any resizing (file sources only)."""
        return None

    def corrupt(self, indices: np.ndarray) -> np.ndarray:
        """Positions in `indices` whose images cannot be decoded (file sources only)."""
        return np.zeros(0, dtype=np.int64)


class ArraySplit(RawSplit):
    """A split already decoded into memory (CIFAR, IDX, digits)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


@dataclass
class OriginalSizes:
    width: np.ndarray
    height: np.ndarray
    file_bytes: np.ndarray


@dataclass
class RawDataset:
    """What a source kind reads from its layout, before the common options are applied."""

    classes: list[str]
    image_shape: ImageShape
    splits: dict[str, RawSplit]
    details: dict[str, Any] = field(default_factory=dict)  # e.g. class descriptions, file counts
    notes: list[str] = field(default_factory=list)  # things the user should know (skipped files)


class PooledSplit(RawSplit):
    """Several raw splits as one (for `resplit`): position k is image `index[k]` of part
    `owner[k]`, with the label `labels[k]` given (already remapped)."""

    def __init__(self, parts: list[tuple[RawSplit, np.ndarray, np.ndarray]],
                 image_shape: ImageShape):  # fmt: skip
        self.parts = [raw for raw, _, _ in parts]
        self.owner = np.concatenate([np.full(len(i), k) for k, (_, i, _) in enumerate(parts)])
        self.index = np.concatenate([i for _, i, _ in parts]).astype(np.int64)
        self.labels = np.concatenate([y for _, _, y in parts]).astype(np.int64)
        self.image_shape = image_shape

    def _by_part(self, positions: np.ndarray):
        """(part number, raw split, where in `positions`, indices in that split)."""
        positions = np.asarray(positions, dtype=np.int64)
        for k, raw in enumerate(self.parts):
            where = np.flatnonzero(self.owner[positions] == k)
            if len(where):
                yield k, raw, where, self.index[positions[where]]

    def load(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        for _, raw, where, inner in self._by_part(indices):
            out[where] = raw.load(inner)
        return out

    def original_sizes(self, indices: np.ndarray) -> OriginalSizes | None:
        n = len(indices)
        sizes = OriginalSizes(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
        for _, raw, where, inner in self._by_part(indices):
            part = raw.original_sizes(inner)
            if part is None:
                return None
            for name in ("width", "height", "file_bytes"):
                getattr(sizes, name)[where] = getattr(part, name)
        return sizes

    def corrupt(self, indices: np.ndarray) -> np.ndarray:
        found = [where[raw.corrupt(inner)] for _, raw, where, inner in self._by_part(indices)]
        return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
