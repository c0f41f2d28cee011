"""The order of training samples in each epoch: drawn from (seed, epoch) in every access mode,
so the access mode changes how fast a run is, never what it learns, and a resumed run continues
exactly."""

from __future__ import annotations

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.options import Option

DEFAULT_BLOCK = 256  # images per block for `shuffle="block"` on stores without chunks
ORDER_OPTIONS = {
    "shuffle": Option(
        "exact", "block reads chunk by chunk, less random (opt-in)", choices=("exact", "block")
    ),
    "shuffle_window": Option(8, "block shuffle: chunks mixed together", kind=int, minimum=1),
    "balance": Option(
        "none",
        "draw classes evenly: weighted sampling or augmented oversampling",
        choices=("none", "weighted", "oversample"),
    ),
}
DEFAULT_WINDOW = ORDER_OPTIONS["shuffle_window"].default  # blocks mixed by `shuffle="block"`


def block_order(indices: np.ndarray, block: int, window: int, rng) -> np.ndarray:
    """Positions of `indices` in a chunk-aware order (FFCV's QUASI_RANDOM): the blocks of
    `block` consecutive store indices in random order, then the images of every `window`
    consecutive blocks mixed together. A reader then decodes each chunk once per epoch with a
    cache of only `window` chunks."""
    blocks = indices // block
    unique, inverse = np.unique(blocks, return_inverse=True)
    rank = np.empty(len(unique), dtype=np.int64)
    rank[rng.permutation(len(unique))] = np.arange(len(unique))
    return np.lexsort((rng.random(len(indices)), rank[inverse] // window))


def order_quality(indices: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """How random an epoch order is, as two numbers a report can show beside the speed.

    - `jump_ratio`: mean distance between consecutive store indices, over its expectation for a
      uniformly random order of the same indices (1 for an exact shuffle, near 0 in order);
    - `same_class`: fraction of consecutive pairs of one class, and `same_class_expected`, its
      expectation for a uniformly random order (higher than expected means class runs).
    """
    n = len(indices)
    if n < 2:
        return {"jump_ratio": None, "same_class": None, "same_class_expected": None}
    values = np.sort(indices).astype(np.float64)
    # E|X - Y| over pairs drawn without replacement from the indices: sum_i (2i - n + 1) v_i.
    expected_jump = 2 * float(np.dot(2 * np.arange(n) - n + 1, values)) / (n * (n - 1))
    jump = float(np.abs(np.diff(indices)).mean())
    counts = np.bincount(labels).astype(np.float64)
    return {
        "jump_ratio": jump / expected_jump if expected_jump else None,
        "same_class": float((labels[1:] == labels[:-1]).mean()),
        "same_class_expected": float((counts * (counts - 1)).sum() / (n * (n - 1))),
    }


class EpochOrder:
    """The order of training samples in each epoch, as (store index, is_copy) pairs.

    `shuffle`: `"exact"` (or True) a uniformly random permutation every epoch; `"block"` the
    chunk-aware order of `block_order` (opt-in: it trades randomness, see `order_quality`, for
    speed on chunked stores); `"none"` (or False) index order.
    `balance="weighted"` draws N samples with replacement, weighted by inverse class frequency
    (WeightedRandomSampler); `"oversample"` adds augmented copies of minority-class images until
    every class has as many as the largest.
    """

    def __init__(self, indices, labels, seed: int, shuffle: bool | str = True,
                 balance: str = "none", block: int | None = None,
                 window: int = DEFAULT_WINDOW):  # fmt: skip
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        shuffle = {True: "exact", False: "none"}.get(shuffle, shuffle)
        if shuffle not in ("exact", "block", "none"):
            raise LoadbenchError(f"shuffle must be exact, block or none, not {shuffle!r}")
        self.seed, self.balance = seed, balance
        self.mode = shuffle
        self.shuffle = shuffle != "none"  # in random order at all
        self.block, self.window = block or DEFAULT_BLOCK, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """(store indices, copy flags) for the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        indices, copies = self.indices, np.zeros(len(self.indices), dtype=bool)
        if self.balance == "weighted":
            counts = np.bincount(self.labels)
            weights = 1.0 / counts[self.labels]
            picked = rng.choice(len(indices), size=len(indices), p=weights / weights.sum())
            return indices[picked], copies
        if self.balance == "oversample":
            extra = []
            counts = np.bincount(self.labels)
            for c in np.flatnonzero(counts):
                members = np.flatnonzero(self.labels == c)
                extra.append(rng.choice(members, size=counts.max() - counts[c]))
            extra = np.concatenate(extra) if extra else np.zeros(0, dtype=np.int64)
            indices = np.concatenate([indices, self.indices[extra]])
            copies = np.concatenate([copies, np.ones(len(extra), dtype=bool)])
        if self.mode == "exact":
            order = rng.permutation(len(indices))
            indices, copies = indices[order], copies[order]
        elif self.mode == "block":
            order = block_order(indices, self.block, self.window, rng)
            indices, copies = indices[order], copies[order]
        return indices, copies

    def _drawn(self) -> tuple[np.ndarray, np.ndarray]:
        """(store indices, their labels) of the current epoch's order."""
        indices, _ = self.draw()
        lookup = np.zeros(int(self.indices.max()) + 1 if len(self.indices) else 1, np.int64)
        lookup[self.indices] = self.labels
        return indices, lookup[indices]

    def class_counts(self, classes: int) -> np.ndarray:
        """Images of each class in the current epoch's order (after balancing)."""
        return np.bincount(self._drawn()[1], minlength=classes)

    def quality(self) -> dict[str, float | None]:
        """`order_quality` of the current epoch's order."""
        return order_quality(*self._drawn())

    def __len__(self) -> int:
        if self.balance == "oversample":
            counts = np.bincount(self.labels)
            return int(counts.max()) * int(np.count_nonzero(counts))
        return len(self.indices)
