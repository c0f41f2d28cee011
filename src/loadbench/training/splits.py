"""Which images of a store train the model and which evaluate it, and the training images'
per-channel statistics (for normalisation: the training split only, document 003)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.sources.selection import stratified_sample

if TYPE_CHECKING:  # annotations only: a store is passed in, never opened here
    from loadbench.store import Store

DEFAULT_VAL_RATIO = 0.1
SPLIT_OPTIONS = {
    "normalize": Option(
        None, "per-channel mean/std of the training images", kind=bool, shown="on; off for cnn-tiny"
    ),
    "val_ratio": Option(
        None,
        "carve a stratified val split from train",
        kind=float,
        above=0,
        below=1,
        shown=f"{DEFAULT_VAL_RATIO} when the store has no val or test split",
    ),
    "eval_split": Option(None, "split to evaluate on", shown="val, else test, else carved"),
}


@dataclass
class SplitPlan:
    """Which images of which split train the model, and which evaluate it."""

    train_split: str
    train_indices: np.ndarray
    eval_split: str | None  # the split name evaluated each epoch ("val" may be carved)
    eval_source: str  # the store split the eval indices point into
    eval_indices: np.ndarray
    test_split: str | None  # a separate test split reported at the end, if any
    note: str
    carved_ratio: float | None = None  # the share of train carved as val, when it was


def plan_splits(store: Store, eval_split: str | None = None, val_ratio: float | None = None,
                seed: int = 0, selects: bool = False) -> SplitPlan:  # fmt: skip
    """Train on `train`; evaluate on `val`, else `test`, else a stratified slice of train.

    `selects`: the evaluation chooses something (early stopping's best epoch), so it must not
    be the test split: without a val split, a val split is carved from train and the test
    split is only reported at the end.
    """
    if "train" not in store.splits:
        raise LoadbenchError(f"{store.path} has no train split (it has {', '.join(store.splits)})")
    all_train = np.arange(len(labels_of(store, "train")))
    test = "test" if "test" in store.splits else None
    if eval_split is not None:
        return _chosen(store, eval_split, all_train, test, selects)
    if val_ratio is None and "val" in store.splits:
        n = store.counts["val"]
        note = f"evaluating on the val split ({n} images)"
        return SplitPlan("train", all_train, "val", "val", np.arange(n), test, note)
    if val_ratio is None and test is not None and not selects:
        n = store.counts["test"]
        note = f"no val split: evaluating on the test split ({n} images)"
        return SplitPlan("train", all_train, "test", "test", np.arange(n), None, note)
    return _carved(store, val_ratio or DEFAULT_VAL_RATIO, seed, test, selects)


def _chosen(store: Store, eval_split: str, all_train: np.ndarray, test: str | None,
            selects: bool) -> SplitPlan:  # fmt: skip
    store._check_split(eval_split)
    if eval_split == "train":
        raise LoadbenchError("eval_split cannot be train; use val, test, or --val-ratio")
    if selects and eval_split == test:
        raise LoadbenchError(
            f"--early-stopping chooses the best epoch on the evaluated split, and --eval-split "
            f"{eval_split} would choose it on test data: leave --eval-split out (a val split is "
            "carved from train when the store has none) or give --val-ratio"
        )
    n = store.counts[eval_split]
    note = f"evaluating on the {eval_split} split ({n} images)"
    other_test = test if test != eval_split else None
    return SplitPlan("train", all_train, eval_split, eval_split, np.arange(n), other_test, note)


def _carved(store: Store, ratio: float, seed: int, test: str | None, selects: bool) -> SplitPlan:
    """A stratified `ratio` of train evaluates; the rest trains."""
    labels = labels_of(store, "train")
    val = stratified_sample(labels, ratio, seed)
    train = np.setdiff1d(np.arange(len(labels)), val)
    why = " for early stopping (it must not choose on the test split)" if selects else ""
    note = (
        f"carved a stratified {ratio:.0%} val split from train{why} ({len(val)} of "
        f"{len(labels)} images, seed {seed})" + ("; the test split is reported at the end"
                                                 if test else "")
    )  # fmt: skip
    return SplitPlan("train", train, "val", "train", val, test, note, carved_ratio=ratio)


def labels_of(store: Store, split: str) -> np.ndarray:
    """All labels of a split, read once per store (most formats keep them apart from the
    images; LMDB must read every record, so the split plan, the run and k-fold share one read).
    Treat the array as read-only."""
    cache = store.__dict__.setdefault("_labels", {})
    if split not in cache:
        cache[split] = store.raw(split).labels()
    return cache[split]


def channel_stats(store: Store, split: str, indices: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1] over `indices` of the training split only."""
    reader = store.raw(split)
    channels = store.image_shape[2]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    indices = np.sort(indices)
    for start in range(0, len(indices), 1024):
        images, _ = reader.read_items(indices[start : start + 1024])
        pixels = images.reshape(-1, channels).astype(np.float64)
        if images.dtype == np.uint8:
            pixels /= 255.0
        total += pixels.sum(axis=0)
        total_sq += (pixels * pixels).sum(axis=0)
    n = max(1, len(indices) * store.image_shape[0] * store.image_shape[1])
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 1e-12))
    return mean.tolist(), std.tolist()
