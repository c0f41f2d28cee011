"""`sample` and `batch` access through torch's DataLoader (and `threads` access, `threaded.py`).

- `sample`: the classic map-style Dataset + DataLoader (`num_workers`, `pin_memory`), one item
  per `__getitem__`, the batch converted to float once.
- `batch`: a DataLoader over a BatchSampler with `batch_size=None`: one `read_batch` call per
  batch (sorted reads, each chunk once).
- With workers, both hand batches back through a ring of shared-memory slots (`RingBatches`)
  instead of torch's per-batch shared-memory transfer.

Each loader counts where its time goes (`stages.py`), in every process that works for it; the
result of `dataloader_batches` carries its counters as `stages`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.utils.data

from loadbench import stages
from loadbench.formats.base import SplitReader
from loadbench.formats.pixels import DTYPES, to_tensor
from loadbench.training.augment import Augmenter, augment_batch
from loadbench.training.order import EpochOrder
from loadbench.training.sharding import Shard, trace_shard


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


class _SampleDataset(torch.utils.data.Dataset):
    """`sample` access: one reader call per image. Without augmentation an item stays in the
    storage dtype and layout, and `_collate_stored` converts the whole batch to float at once; with
    augmentation each image is converted and augmented in the worker."""

    def __init__(self, reader: SplitReader, augmenter: Augmenter | None,
                 counters: stages.StageCounters | None = None):  # fmt: skip
        self.reader, self.augmenter = reader, augmenter
        self.counters = counters if counters is not None else stages.UNCOUNTED

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key):
        position, index, copy, epoch = key
        image, label = self.reader.read(index)
        if self.augmenter is None:
            return torch.from_numpy(image), label
        self.counters.lap(stages.READ)
        return self.augmenter(to_tensor(image), position, copy, epoch), label

    def __getitems__(self, keys):
        """A batch's items, one `__getitem__` each as torch's fetcher would call them, timed
        per batch: timing each image would cost ~2% of an npy image's time (130 of 7,700 ns)."""
        counters = self.counters
        counters.begin()
        if self.augmenter is None:
            items = [self[key] for key in keys]
            counters.lap(stages.READ)
            counters.count(len(keys))  # `_collate_stored` ends the batch
            return items
        items = []
        for key in keys:  # an item's read is lapped in `__getitem__`, its augmentation here
            items.append(self[key])
            counters.lap(stages.AUGMENT)
        counters.end(stages.AUGMENT, len(keys))  # torch's collate stacks them, uncounted
        return items


def _collate_stored(items):
    """Stored (H, W, C) images of a batch -> one float32 (N, C, H, W) tensor, one conversion."""
    images = torch.stack([item[0] for item in items])
    batch = to_tensor(images), torch.tensor([item[1] for item in items], dtype=torch.int64)
    stages.end(stages.COLLATE)  # the batch `_SampleDataset.__getitems__` began
    return batch


class _BatchDataset(_SampleDataset):
    """`batch` access: one `read_batch` per batch (keys are lists of sampler tuples)."""

    def __getitem__(self, keys):
        self.counters.begin()
        batch = self._batch(keys)
        self.counters.end(stages.COLLATE if self.augmenter is None else stages.AUGMENT, len(keys))
        return batch

    def _batch(self, keys):
        images, labels = self.reader.read_batch_tensor([k[1] for k in keys])
        self.counters.lap(stages.COLLATE)  # `read_batch_tensor` laps its read
        return augment_batch(images, keys, self.augmenter), labels


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
    labels (bytes). `per_item` (sample access) reads image by image, as a map-style Dataset
    does, then (unaugmented) copies the batch into its slot at once, as its collate does; else
    (batch access) with one `read_batch`."""

    def __init__(self, reader: SplitReader, augmenter: Augmenter | None, ring: torch.Tensor,
                 per_item: bool, counters: stages.StageCounters | None = None):  # fmt: skip
        super().__init__(reader, augmenter, counters)
        self.ring, self.per_item = ring, per_item

    def __getitem__(self, numbered):
        number, keys = numbered
        counters = self.counters
        counters.begin()
        slot = number % len(self.ring)
        out = self.ring[slot]
        if self.per_item:
            labels = np.empty(len(keys), dtype=np.int64)
            stored = [] if self.augmenter is None else None
            for k, (position, index, copy, epoch) in enumerate(keys):
                image, labels[k] = self.reader.read(index)
                if stored is not None:
                    stored.append(image)
                else:
                    counters.lap(stages.READ)
                    out[k] = self.augmenter(to_tensor(image), position, copy, epoch)
                    counters.lap(stages.AUGMENT)
            if stored is not None:
                counters.lap(stages.READ)
                np.stack(stored, out=out[: len(keys)].numpy())
        elif self.augmenter is None:  # decoded or gathered straight into the slot
            indices = self.reader.check_indices([k[1] for k in keys])
            labels = self.reader.read_batch_into(indices, out[: len(keys)].numpy())
            counters.lap(stages.READ)
        else:
            images, labels = self.reader.read_batch_tensor([k[1] for k in keys])
            counters.lap(stages.COLLATE)  # `read_batch_tensor` laps its read
            out[: len(keys)] = augment_batch(images, keys, self.augmenter)
        counters.end(stages.COLLATE if self.augmenter is None else stages.AUGMENT, len(keys))
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
                 augmenter: Augmenter | None, per_item: bool = False,
                 counters: stages.StageCounters | None = None):  # fmt: skip
        h, w, c = reader.image_shape
        slots = self.PREFETCH * workers + 2
        if augmenter is None:  # stored pixels; converted to float here, once per batch
            shape, dtype = (h, w, c), torch.from_numpy(np.empty(0, DTYPES[reader.dtype])).dtype
        else:  # augmented in the workers: float32 (C, H, W)
            shape, dtype = (c, h, w), torch.float32
        self.ring = torch.empty((slots, batch_size, *shape), dtype=dtype).share_memory_()
        self.augmenter, self.pin_memory = augmenter, pin_memory
        self.stages = counters
        self._counters = counters if counters is not None else stages.UNCOUNTED
        self.loader = torch.utils.data.DataLoader(
            _RingDataset(reader, augmenter, self.ring, per_item, counters), batch_size=None,
            sampler=_NumberedBatches(batches), num_workers=workers, persistent_workers=True,
            prefetch_factor=self.PREFETCH,
        )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for slot, n, label_bytes in self.loader:
            self._counters.begin()
            view = self.ring[slot, :n]
            images = to_tensor(view) if self.augmenter is None else view
            if images.data_ptr() == view.data_ptr():  # float32 stores, augmented: copy out
                images = images.clone()
            labels = torch.frombuffer(bytearray(label_bytes), dtype=torch.int64)
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            self._counters.end(stages.COLLATE)
            yield images, labels

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        stop_workers(self.loader)


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop a DataLoader's persistent workers now. Left to the garbage collector, a DataLoader
    with persistent workers waits 5 s per worker before it gives up joining them (measured:
    20 s after a run with 2 workers)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


def dataloader_batches(reader: SplitReader, order: EpochOrder, *, access: str,
                       batch_size: int, workers: int, pin_memory: bool,
                       augmenter: Augmenter | None, shard: Shard | None = None):  # fmt: skip
    """`sample` or `batch` access to a reader through a DataLoader (or the ring of
    `RingBatches` with workers), or `threads` access (`threaded.py`, max(1, workers) threads);
    with a `shard`, this rank's part of each epoch. Its `stages` are its stage counters (None
    when counting is off)."""
    sampler = EpochSampler(order, shard)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    image_bytes = math.prod(reader.image_shape) * np.dtype(DTYPES[reader.dtype]).itemsize
    counters = stages.new_counters(image_bytes)  # made before any worker starts
    if access == "threads":  # in threads of this process: as many as the workers asked for
        from loadbench.training.threaded import ThreadedBatches

        return ThreadedBatches(reader, batches, batch_size=batch_size, threads=max(1, workers),
                               pin_memory=pin_memory, augmenter=augmenter,
                               counters=counters)  # fmt: skip
    if workers:  # per item (sample) or per batch, through a ring of shared buffers
        return RingBatches(reader, batches, batch_size=batch_size, workers=workers,
                           pin_memory=pin_memory, augmenter=augmenter,
                           per_item=access == "sample", counters=counters)  # fmt: skip
    if access == "sample":
        loader = torch.utils.data.DataLoader(
            _SampleDataset(reader, augmenter, counters), batch_size=batch_size, sampler=sampler,
            collate_fn=_collate_stored if augmenter is None else None, pin_memory=pin_memory,
        )  # fmt: skip
    else:
        loader = torch.utils.data.DataLoader(
            _BatchDataset(reader, augmenter, counters), batch_size=None, sampler=batches,
            pin_memory=pin_memory,
        )  # fmt: skip
    loader.stages = counters
    return loader
