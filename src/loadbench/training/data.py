"""From a store to batches on the device, by the three access modes the study compares.

- `sample`: the classic map-style Dataset + DataLoader (`num_workers`, `pin_memory`), one item
  per `__getitem__`.
- `batch`: a DataLoader over a BatchSampler with `batch_size=None`: one `read_batch` call per
  batch (sorted reads, each chunk once), still with workers.
- `device`: the whole split resident on the training device, indexed by a permutation drawn
  there; no DataLoader, no per-sample Python (airbench's loader).

Every mode draws the same epoch order from (seed, epoch), and augments sample i of epoch e with
randomness seeded by (seed, epoch, i), so the access mode changes how fast a run is, never what
it learns, and a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from loadbench.errors import LoadbenchError
from loadbench.formats.base import SplitReader, to_tensor
from loadbench.sources.base import stratified_sample
from loadbench.store import Store

DEFAULT_VAL_RATIO = 0.1


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


def plan_splits(
    store: Store, eval_split: str | None = None, val_ratio: float | None = None, seed: int = 0
) -> SplitPlan:
    """Train on `train`; evaluate on `val`, else `test`, else a stratified slice of train."""
    if "train" not in store.splits:
        raise LoadbenchError(f"{store.path} has no train split (it has {', '.join(store.splits)})")
    train_labels = labels_of(store, "train")
    all_train = np.arange(len(train_labels))
    test = "test" if "test" in store.splits else None
    if eval_split is not None:
        store._check_split(eval_split)
        if eval_split == "train":
            raise LoadbenchError("eval_split cannot be train; use val, test, or --val-ratio")
        n = store.counts[eval_split]
        note = f"evaluating on the {eval_split} split ({n} images)"
        other_test = test if test != eval_split else None
        return SplitPlan("train", all_train, eval_split, eval_split, np.arange(n), other_test, note)
    if val_ratio is None and "val" in store.splits:
        n = store.counts["val"]
        note = f"evaluating on the val split ({n} images)"
        return SplitPlan("train", all_train, "val", "val", np.arange(n), test, note)
    if val_ratio is None and test is not None:
        n = store.counts["test"]
        note = f"no val split: evaluating on the test split ({n} images)"
        return SplitPlan("train", all_train, "test", "test", np.arange(n), None, note)
    ratio = val_ratio or DEFAULT_VAL_RATIO
    val = stratified_sample(train_labels, ratio, seed)
    train = np.setdiff1d(all_train, val)
    note = (
        f"carved a stratified {ratio:.0%} val split from train ({len(val)} of "
        f"{len(all_train)} images, seed {seed})"
    )
    return SplitPlan("train", train, "val", "train", val, test, note)


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


# -- augmentation ------------------------------------------------------------------------------


def build_augment(names: list[str], image_shape: tuple[int, int, int]):
    """torchvision transforms v2 on one (C, H, W) float image, or None for no augmentation."""
    if not names:
        return None
    from torchvision.transforms import v2

    h, w, c = image_shape
    steps = []
    if "crop" in names:
        steps.append(v2.RandomCrop((h, w), padding=max(1, min(h, w) // 8), padding_mode="reflect"))
    if "flip" in names:
        steps.append(v2.RandomHorizontalFlip())
    if "rotate" in names:
        steps.append(v2.RandomRotation(15))
    if "jitter" in names:
        # Saturation and hue need colour; grayscale images get brightness and contrast only.
        colour = {"saturation": 0.2, "hue": 0.02} if c == 3 else {}
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, **colour))
    return v2.Compose(steps)


def seeded(transform, image: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    """Apply `transform` with randomness that depends only on (seed, epoch, index).

    Workers, access modes and resumed runs then augment every sample identically.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)
        return transform(image)


# -- epoch plans -------------------------------------------------------------------------------


class EpochOrder:
    """The order of training samples in each epoch, as (store index, is_copy) pairs.

    `balance="weighted"` draws N samples with replacement, weighted by inverse class frequency
    (WeightedRandomSampler); `"oversample"` adds augmented copies of minority-class images until
    every class has as many as the largest.
    """

    def __init__(self, indices, labels, seed: int, shuffle: bool = True, balance: str = "none"):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed, self.shuffle, self.balance = seed, shuffle, balance
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
        if self.shuffle:
            order = rng.permutation(len(indices))
            indices, copies = indices[order], copies[order]
        return indices, copies

    def __len__(self) -> int:
        if self.balance == "oversample":
            counts = np.bincount(self.labels)
            return int(counts.max()) * int(np.count_nonzero(counts))
        return len(self.indices)


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (position in epoch, store index, is_copy, epoch) for a DataLoader."""

    def __init__(self, order: EpochOrder):
        self.order = order

    def __iter__(self):
        indices, copies = self.order.draw()
        epoch = self.order.epoch
        for position, (index, copy) in enumerate(
            zip(indices.tolist(), copies.tolist(), strict=True)
        ):
            yield (position, index, copy, epoch)

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class Augmenter:
    """Who is augmented how: everyone with `augment`, oversampled copies with `copy_augment`."""

    augment: object | None
    copy_augment: object | None
    seed: int

    def __call__(self, image: torch.Tensor, position: int, copy: bool, epoch: int):
        transform = self.copy_augment if copy and self.copy_augment is not None else self.augment
        if transform is None:
            return image
        return seeded(transform, image, self.seed, epoch, position)


class _SampleDataset(torch.utils.data.Dataset):
    """`sample` access: one reader call per image, augmented in the worker."""

    def __init__(self, reader: SplitReader, augmenter: Augmenter | None):
        self.reader, self.augmenter = reader, augmenter

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key):
        position, index, copy, epoch = key
        image, label = self.reader.read(index)
        tensor = to_tensor(image)
        if self.augmenter is not None:
            tensor = self.augmenter(tensor, position, copy, epoch)
        return tensor, label


class _BatchDataset(_SampleDataset):
    """`batch` access: one `read_batch` per batch (keys are lists of sampler tuples)."""

    def __getitem__(self, keys):
        images, labels = self.reader.read_batch_tensor([k[1] for k in keys])
        return _augment_batch(images, keys, self.augmenter), labels


def _augment_batch(images: torch.Tensor, keys, augmenter: Augmenter | None) -> torch.Tensor:
    if augmenter is None:
        return images
    return torch.stack(
        [augmenter(img, k[0], k[2], k[3]) for img, k in zip(images, keys, strict=True)]
    )


def resident_split(store: Store, split: str, device: torch.device):
    """(images, labels) of a whole split on `device`, loaded once per store, split and device
    (a val split carved from train shares the train split's copy)."""
    cache = store.__dict__.setdefault("_resident", {})
    key = (split, str(device))
    if key not in cache:
        reader = store.new_reader(split)
        if store.format_name == "tensor":  # loads itself onto the device, through CuPy if there
            reader.device = str(device)
            cache[key] = (reader.handle["images"], reader.handle["labels"])
        else:  # any other format: read the whole split once, then it lives on the device
            images, labels = reader.read_items(np.arange(len(reader)))
            cache[key] = (torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device))
    return cache[key]


class DeviceBatches:
    """`device` access: the split on the device, batches gathered there by index."""

    def __init__(self, store: Store, split: str, order: EpochOrder, batch_size: int, device,
                 augmenter: Augmenter | None):  # fmt: skip
        self.order, self.batch_size, self.augmenter = order, batch_size, augmenter
        self.device = torch.device(device)
        self.images, self.labels = resident_split(store, split, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, copies = self.order.draw()
        epoch = self.order.epoch
        index = torch.from_numpy(indices).to(self.device)
        for start in range(0, len(indices), self.batch_size):
            batch = index[start : start + self.batch_size]
            images, labels = to_tensor(self.images[batch]), self.labels[batch]
            if self.augmenter is not None:
                keys = [
                    (start + k, int(indices[start + k]), bool(copies[start + k]), epoch)
                    for k in range(len(batch))
                ]  # fmt: skip
                images = _augment_batch(images, keys, self.augmenter)
            yield images, labels

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)


def make_batches(
    store: Store,
    split: str,
    order: EpochOrder,
    *,
    access: str,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    device,
    augmenter: Augmenter | None,
):
    """An iterable of (images float32 N,C,H,W in [0,1], labels int64 N) for one split."""
    if access == "device":
        return DeviceBatches(store, split, order, batch_size, device, augmenter)
    reader = store.new_reader(split)
    reader.device = "cpu"  # a DataLoader moves batches to the device itself (tensor format too)
    sampler = _EpochSampler(order)
    common = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    if access == "sample":
        return torch.utils.data.DataLoader(
            _SampleDataset(reader, augmenter), batch_size=batch_size, sampler=sampler, **common
        )
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    return torch.utils.data.DataLoader(
        _BatchDataset(reader, augmenter), batch_size=None, sampler=batches, **common
    )
