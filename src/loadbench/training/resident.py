"""`device` access: the whole split resident on the training device, indexed by a permutation
drawn there; no DataLoader, no per-sample Python (airbench's loader)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from loadbench.formats.pixels import DTYPES, to_tensor
from loadbench.store import Store
from loadbench.training.augment import Augmenter
from loadbench.training.order import EpochOrder
from loadbench.training.sharding import Shard, shard_order, trace_shard


def resident_split(store: Store, split: str, device: torch.device):
    """(images, labels) of a whole split on `device`, loaded once per store, split and device
    (a val split carved from train shares the train split's copy)."""
    cache = store.__dict__.setdefault("_resident", {})
    key = (split, str(device))
    if key not in cache:
        cache[key] = store.new_reader(split).resident(device)
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
            if self.augmenter is not None:  # one batched call, the keys as arrays
                stop = start + len(batch)
                positions = self.offset + np.arange(start, stop)
                images = self.augmenter.batch(images, positions, copies[start:stop], epoch)
            yield images, labels

    def __len__(self) -> int:
        return math.ceil(len(self.local) / self.batch_size)
