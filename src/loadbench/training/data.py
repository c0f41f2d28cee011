"""From a store to batches on the device, by the three access modes the study compares.

- `sample`: the classic map-style Dataset + DataLoader (`num_workers`, `pin_memory`), one item
  per `__getitem__`, the batch converted to float once.
- `batch`: a DataLoader over a BatchSampler with `batch_size=None`: one `read_batch` call per
  batch (sorted reads, each chunk once).
- With workers, both hand batches back through a ring of shared-memory slots (`RingBatches`)
  instead of torch's per-batch shared-memory transfer.
- `device`: the whole split resident on the training device, indexed by a permutation drawn
  there; no DataLoader, no per-sample Python (airbench's loader).

Every mode draws the same epoch order from (seed, epoch), and augments sample i of epoch e with
randomness seeded by (seed, epoch, i), so the access mode changes how fast a run is, never what
it learns, and a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from loadbench.errors import LoadbenchError
from loadbench.formats.base import DTYPES, SplitReader, to_tensor
from loadbench.sources.base import stratified_sample
from loadbench.store import Store
from loadbench.training.config import ORDER_DEFAULTS

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


DEFAULT_BLOCK = 256  # images per block for `shuffle="block"` on stores without chunks
DEFAULT_WINDOW = ORDER_DEFAULTS["shuffle_window"]  # blocks mixed by `shuffle="block"`


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

    def quality(self) -> dict[str, float | None]:
        """`order_quality` of the current epoch's order."""
        indices, _ = self.draw()
        lookup = np.zeros(int(self.indices.max()) + 1 if len(self.indices) else 1, np.int64)
        lookup[self.indices] = self.labels
        return order_quality(indices, lookup[indices])

    def __len__(self) -> int:
        if self.balance == "oversample":
            counts = np.bincount(self.labels)
            return int(counts.max()) * int(np.count_nonzero(counts))
        return len(self.indices)


@dataclass(frozen=True)
class Shard:
    """This process's part of every epoch under DDP: rank `rank` of `world`.

    `even` (training): every rank gets as many samples, because DDP ranks step in lockstep;
    the epoch's positions are padded by wrapping around to a multiple of `world`, as torch's
    DistributedSampler does. Not even (evaluation): an exact partition, so that gathered metrics
    count every image once.
    """

    rank: int
    world: int
    even: bool = True

    def sampler(self, length: int) -> torch.utils.data.DistributedSampler:
        """torch's DistributedSampler over `length` positions: padded, then rank::world.
        `shuffle=False`, because the positions index an epoch order that is shuffled already."""
        return torch.utils.data.DistributedSampler(
            range(length), num_replicas=self.world, rank=self.rank, shuffle=False
        )

    def positions(self, length: int) -> np.ndarray:
        """The positions in 0..length-1 that this rank takes (sample and batch access)."""
        if self.even:
            return np.fromiter(iter(self.sampler(length)), dtype=np.int64)
        return np.array_split(np.arange(length), self.world)[self.rank]

    def block(self, length: int) -> np.ndarray:
        """A contiguous 1/world of 0..length-1 (device access: what this rank keeps resident),
        padded by wrapping around like `positions` when even."""
        if not self.even or length == 0:
            return np.array_split(np.arange(length), self.world)[self.rank]
        per = math.ceil(length / self.world)
        padded = np.resize(np.arange(length), per * self.world)
        return padded[self.rank * per : (self.rank + 1) * per]


DEBUG_INDICES = "LOADBENCH_DEBUG_INDICES"


def trace_shard(shard: Shard, epoch: int, indices: np.ndarray) -> None:
    """Debug hook: with LOADBENCH_DEBUG_INDICES=DIR, each rank appends the store indices of its
    training shard of every epoch to DIR/rank-R.jsonl, to see that ranks read disjoint data."""
    where = os.environ.get(DEBUG_INDICES)
    if not where:
        return
    line = json.dumps({"rank": shard.rank, "world": shard.world, "epoch": epoch,
                       "indices": [int(i) for i in indices]})  # fmt: skip
    with open(os.path.join(where, f"rank-{shard.rank}.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")


class EpochSampler(torch.utils.data.Sampler):
    """Yields (position in epoch, store index, is_copy, epoch) for a DataLoader; with a
    `shard`, only this rank's positions of the epoch (whose order every rank draws alike)."""

    def __init__(self, order: EpochOrder, shard: Shard | None = None):
        self.order, self.shard = order, shard
        self.split = shard.sampler(len(order)) if shard is not None and shard.even else None

    def __iter__(self):
        indices, copies = self.order.draw()
        epoch = self.order.epoch
        if self.shard is None:
            for position, (index, copy) in enumerate(
                zip(indices.tolist(), copies.tolist(), strict=True)
            ):
                yield (position, index, copy, epoch)
            return
        if self.split is not None:
            self.split.set_epoch(epoch)  # a no-op without its shuffle; called as DDP users do
            positions = np.fromiter(iter(self.split), dtype=np.int64)
        else:
            positions = self.shard.positions(len(indices))
        if self.shard.even:
            trace_shard(self.shard, epoch, indices[positions])
        for position in positions.tolist():
            yield (position, int(indices[position]), bool(copies[position]), epoch)

    def __len__(self) -> int:
        if self.shard is None:
            return len(self.order)
        if self.split is not None:
            return len(self.split)
        return len(self.shard.positions(len(self.order)))


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
    """`sample` access: one reader call per image. Without augmentation an item stays in the
    storage dtype and layout, and `_collate_stored` converts the whole batch to float at once; with
    augmentation each image is converted and augmented in the worker."""

    def __init__(self, reader: SplitReader, augmenter: Augmenter | None):
        self.reader, self.augmenter = reader, augmenter

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key):
        position, index, copy, epoch = key
        image, label = self.reader.read(index)
        if self.augmenter is None:
            return torch.from_numpy(image), label
        return self.augmenter(to_tensor(image), position, copy, epoch), label


def _collate_stored(items):
    """Stored (H, W, C) images of a batch -> one float32 (N, C, H, W) tensor, one conversion."""
    images = torch.stack([item[0] for item in items])
    return to_tensor(images), torch.tensor([item[1] for item in items], dtype=torch.int64)


class _BatchDataset(_SampleDataset):
    """`batch` access: one `read_batch` per batch (keys are lists of sampler tuples)."""

    def __getitem__(self, keys):
        images, labels = self.reader.read_batch_tensor([k[1] for k in keys])
        return _augment_batch(images, keys, self.augmenter), labels


class _NumberedBatches(torch.utils.data.Sampler):
    """The batches of an epoch with their number: which ring slot each one fills."""

    def __init__(self, batches: torch.utils.data.BatchSampler):
        self.batches = batches

    def __iter__(self):
        return enumerate(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _RingDataset(_SampleDataset):
    """Access with workers: a worker fills slot k % S of a ring of shared-memory buffers made
    before the workers start with batch k, and sends back only the slot, the count and the
    labels (bytes). `per_item` (sample access) reads and writes image by image, as a
    map-style Dataset does; else (batch access) with one `read_batch`."""

    def __init__(self, reader: SplitReader, augmenter: Augmenter | None, ring: torch.Tensor,
                 per_item: bool):  # fmt: skip
        super().__init__(reader, augmenter)
        self.ring, self.per_item = ring, per_item

    def __getitem__(self, numbered):
        number, keys = numbered
        slot = number % len(self.ring)
        out = self.ring[slot]
        if self.per_item:
            labels = np.empty(len(keys), dtype=np.int64)
            pixels = out.numpy() if self.augmenter is None else None
            for k, (position, index, copy, epoch) in enumerate(keys):
                image, labels[k] = self.reader.read(index)
                if pixels is not None:
                    pixels[k] = image
                else:
                    out[k] = self.augmenter(to_tensor(image), position, copy, epoch)
        elif self.augmenter is None:
            images, labels = self.reader.read_batch([k[1] for k in keys])
            out[: len(keys)].numpy()[...] = images
        else:
            images, labels = self.reader.read_batch_tensor([k[1] for k in keys])
            out[: len(keys)] = _augment_batch(images, keys, self.augmenter)
        return slot, len(keys), np.asarray(labels, dtype=np.int64).tobytes()


class RingBatches:
    """Access with DataLoader workers, without torch's per-batch transfer.

    A DataLoader sends each batch from a worker through a new shared-memory segment (create,
    map, fault every page in, send the descriptor, map again): about 3 ms a batch on this
    machine, which capped 2 workers at ~90k 32x32 images/s where one process reads 500k. Here
    the workers fill slots of one ring made at the start. The ring has 2 slots more than the
    batches that can be in flight (`prefetch_factor` x workers), because the DataLoader sends
    batch k + prefetch_factor x workers to a worker only once batch k is handed out, and batch
    k - 1 has been copied out of its slot by then: a slot is never written while it is read.
    Every batch handed out is memory of its own.
    """

    PREFETCH = 2

    def __init__(self, reader: SplitReader, batches: torch.utils.data.BatchSampler, *,
                 batch_size: int, workers: int, pin_memory: bool,
                 augmenter: Augmenter | None, per_item: bool = False):  # fmt: skip
        h, w, c = reader.image_shape
        slots = self.PREFETCH * workers + 2
        if augmenter is None:  # stored pixels; converted to float here, once per batch
            shape, dtype = (h, w, c), torch.from_numpy(np.empty(0, DTYPES[reader.dtype])).dtype
        else:  # augmented in the workers: float32 (C, H, W)
            shape, dtype = (c, h, w), torch.float32
        self.ring = torch.empty((slots, batch_size, *shape), dtype=dtype).share_memory_()
        self.augmenter, self.pin_memory = augmenter, pin_memory
        self.loader = torch.utils.data.DataLoader(
            _RingDataset(reader, augmenter, self.ring, per_item), batch_size=None,
            sampler=_NumberedBatches(batches), num_workers=workers, persistent_workers=True,
            prefetch_factor=self.PREFETCH,
        )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for slot, n, label_bytes in self.loader:
            view = self.ring[slot, :n]
            images = to_tensor(view) if self.augmenter is None else view
            if images.data_ptr() == view.data_ptr():  # float32 stores, augmented: copy out
                images = images.clone()
            labels = torch.frombuffer(bytearray(label_bytes), dtype=torch.int64)
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        shutdown(self.loader)


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


def resident_rows(store: Store, split: str, device: torch.device, rows: np.ndarray):
    """(images, labels) of only the store indices `rows` (sorted, unique) of a split, on
    `device`: a rank's shard under DDP, which is all that rank reads."""
    reader = store.new_reader(split)
    reader.device = "cpu"  # the tensor format would load its whole split onto the device
    if not len(rows):
        h, w, c = reader.image_shape
        empty = np.empty((0, h, w, c), DTYPES[reader.dtype])
        return torch.from_numpy(empty).to(device), torch.zeros(0, dtype=torch.int64, device=device)
    images, labels = reader.read_items(rows)
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)


def shard_order(order: EpochOrder, shard: Shard) -> tuple[EpochOrder, int]:
    """The order of a rank's device shard: the contiguous part `shard.block` of the order's
    images, permuted within itself each epoch; and the position of the part's first image."""
    if order.balance == "oversample":
        raise LoadbenchError(
            "balance oversample with device access cannot run under torchrun: each rank's "
            "shard would get a different number of copies; use sample or batch access"
        )
    part = shard.block(len(order.indices))
    # One seed for the run, a random stream per rank: ranks do not permute alike.
    seed = int(np.random.SeedSequence([order.seed, shard.rank]).generate_state(1)[0])
    local = EpochOrder(order.indices[part], order.labels[part], seed, shuffle=order.mode,
                       balance=order.balance, block=order.block, window=order.window)  # fmt: skip
    return local, int(part[0]) if len(part) else 0


class DeviceBatches:
    """`device` access: the split on the device, batches gathered there by index. With a
    `shard` (DDP), only the rank's contiguous part of the order's images is resident, and each
    epoch is a permutation within that part."""

    def __init__(self, store: Store, split: str, order: EpochOrder, batch_size: int, device,
                 augmenter: Augmenter | None, shard: Shard | None = None):  # fmt: skip
        self.order, self.batch_size, self.augmenter = order, batch_size, augmenter
        self.device = torch.device(device)
        self.shard, self.local, self.offset, self.rows = shard, order, 0, None
        if shard is None:
            self.images, self.labels = resident_split(store, split, self.device)
        else:
            self.local, self.offset = shard_order(order, shard)
            self.rows = np.unique(self.local.indices)  # the store index of each resident row
            self.images, self.labels = resident_rows(store, split, self.device, self.rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.order.epoch
        self.local.set_epoch(epoch)
        indices, copies = self.local.draw()
        if self.shard is not None and self.shard.even:
            trace_shard(self.shard, epoch, indices)
        resident = indices if self.rows is None else np.searchsorted(self.rows, indices)
        index = torch.from_numpy(resident).to(self.device)
        for start in range(0, len(indices), self.batch_size):
            batch = index[start : start + self.batch_size]
            images, labels = to_tensor(self.images[batch]), self.labels[batch]
            if self.augmenter is not None:
                keys = [
                    (self.offset + start + k, int(indices[start + k]), bool(copies[start + k]),
                     epoch)
                    for k in range(len(batch))
                ]  # fmt: skip
                images = _augment_batch(images, keys, self.augmenter)
            yield images, labels

    def __len__(self) -> int:
        return math.ceil(len(self.local) / self.batch_size)


def shutdown(batches) -> None:
    """Stop the worker processes behind `batches` now. Left to the garbage collector, a
    DataLoader with persistent workers waits 5 s per worker before it gives up joining them
    (measured: 20 s after a run with 2 workers)."""
    close = getattr(batches, "close", None)
    if callable(close):  # RingBatches, peer loaders
        close()
        return
    # A DataLoader, or a pipeline of stages that starts with one (webdataset's WebLoader).
    stages = [batches, *getattr(batches, "pipeline", [])]
    for loader in stages:
        iterator = getattr(loader, "_iterator", None)
        if isinstance(loader, torch.utils.data.DataLoader) and iterator is not None:
            if hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None


_NOT_SHARDED = (
    "{name} runs its library's own loader, which loadbench cannot shard across torchrun's "
    "processes; run it in a single process, or use one of loadbench's formats"
)


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
    shard: Shard | None = None,
):
    """An iterable of (images float32 N,C,H,W in [0,1], labels int64 N) for one split; with a
    `shard` (DDP), this rank's part of it."""
    fmt = store.format
    if fmt is not None and access not in fmt.accesses:
        raise LoadbenchError(
            f"{fmt.name} runs its own pipeline with {'/'.join(fmt.accesses)} access only, "
            f"not {access}"
        )
    if fmt is not None and fmt.own_order and order.mode == "block":
        raise LoadbenchError(f"{fmt.name} streams in its library's own order; use shuffle exact")
    if shard is not None and fmt is not None and (fmt.peer or fmt.own_order):
        raise LoadbenchError(_NOT_SHARDED.format(name=fmt.name))
    if access == "device":
        return DeviceBatches(store, split, order, batch_size, device, augmenter, shard)
    reader = store.new_reader(split)
    reader.device = "cpu"  # a DataLoader moves batches to the device itself (tensor format too)
    own = reader.loader(order, access=access, batch_size=batch_size, workers=workers,
                        pin_memory=pin_memory, augmenter=augmenter)  # fmt: skip
    if own is not None and shard is not None:
        shutdown(own)
        raise LoadbenchError(_NOT_SHARDED.format(name=store.format_name))
    if own is not None:  # a peer loader: its library's own pipeline
        return own
    sampler = EpochSampler(order, shard)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    if workers:  # per item (sample) or per batch, through a ring of shared buffers
        return RingBatches(reader, batches, batch_size=batch_size, workers=workers,
                           pin_memory=pin_memory, augmenter=augmenter,
                           per_item=access == "sample")  # fmt: skip
    if access == "sample":
        return torch.utils.data.DataLoader(
            _SampleDataset(reader, augmenter), batch_size=batch_size, sampler=sampler,
            collate_fn=_collate_stored if augmenter is None else None, pin_memory=pin_memory,
        )  # fmt: skip
    return torch.utils.data.DataLoader(
        _BatchDataset(reader, augmenter), batch_size=None, sampler=batches, pin_memory=pin_memory
    )
