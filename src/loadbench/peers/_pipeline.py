"""The torch side every peer loader shares: the epoch its workers see, map-style sampling in
loadbench's epoch order, and streaming epochs re-batched to the run's batch size.

The map-style peers (ImageFolder, datasets) see exactly loadbench's epoch order (a sampler that
follows `EpochOrder.draw()`); the streaming peers (webdataset, litdata) use their library's own
shuffle, seeded from (seed, epoch), which is what their users get.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.utils.data

from loadbench.formats.pixels import to_tensor
from loadbench.peers._base import loader_args
from loadbench.training.loaders import EpochSampler, stop_workers


class SharedEpoch:
    """The current epoch, readable by persistent DataLoader workers.

    Workers hold copies of the dataset made when they started, so a plain attribute set by the
    training loop would stay stale there; a shared-memory tensor does not.
    """

    def __init__(self):
        self.value = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self.value[0] = epoch

    def get(self) -> int:
        return int(self.value[0])


class KeyedSamples(torch.utils.data.Dataset):
    """Map-style peers: keys are `EpochSampler` tuples (position, index, copy, epoch).

    The reader's `samples(indices)` goes through the peer's library; augmentation is seeded by
    (seed, epoch, position) exactly as loadbench's own `sample` access does.
    """

    def __init__(self, reader, augmenter):
        self.reader, self.augmenter = reader, augmenter

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        # DataLoader hands a whole batch of keys here when it exists (datasets' batched fetch).
        items = self.reader.samples([k[1] for k in keys])
        if self.augmenter is None:
            return items
        return [
            (self.augmenter(image, k[0], k[2], k[3]), label)
            for (image, label), k in zip(items, keys, strict=True)
        ]


def map_style_loader(reader, order, batch_size, workers, pin_memory, augmenter):
    """A DataLoader over the reader's `samples`, in loadbench's epoch order."""
    return torch.utils.data.DataLoader(
        KeyedSamples(reader, augmenter),
        batch_size=batch_size,
        sampler=EpochSampler(order),
        **loader_args(workers, pin_memory),
    )


def collate(samples):
    """(image C,H,W, label, index) samples -> (images N,C,H,W, labels N, indices N)."""
    images, labels, indices = zip(*samples, strict=True)
    return (
        torch.stack(list(images)),
        torch.as_tensor([int(x) for x in labels], dtype=torch.int64),
        torch.as_tensor([int(x) for x in indices], dtype=torch.int64),
    )


class Sample:
    """One decoded image -> (float32 C,H,W in [0, 1], label, index), augmented in the worker.

    Streaming peers have no epoch position for a sample, so augmentation is seeded by
    (seed, epoch, store index) instead.
    """

    def __init__(self, augmenter, epoch: SharedEpoch):
        self.augmenter, self.epoch = augmenter, epoch

    def __call__(self, image, label, index):
        image = np.asarray(image)
        tensor = to_tensor(image[:, :, None] if image.ndim == 2 else image)
        index = int(index)
        if self.augmenter is not None:
            tensor = self.augmenter(tensor, index, False, self.epoch.get())
        return tensor, int(label), index


class EpochStream(torch.utils.data.IterableDataset):
    """A streaming peer's dataset: each epoch (in each worker) iterates `build(epoch, worker)`,
    the library's pipeline made again with that epoch's seeds."""

    def __init__(self, build):
        self.build = build
        self.epoch = SharedEpoch()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return iter(self.build(self.epoch.get(), info.id if info is not None else 0))


def rebatch(batches, size: int, keep: np.ndarray | None, pin_memory: bool):
    """Batches of exactly `size` (the last one partial) from batches of any size, keeping only
    samples whose index is in `keep` (None: all)."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    held = 0
    for images, labels, indices in batches:
        if keep is not None:
            mask = torch.from_numpy(np.isin(indices.numpy(), keep))
            if not bool(mask.all()):
                images, labels = images[mask], labels[mask]
        if not pending and len(labels) == size:
            yield images, labels
            continue
        pending.append((images, labels))
        held += len(labels)
        while held >= size:
            images, labels = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            yield _pinned(images[:size], pin_memory), labels[:size]
            pending = [(images[size:], labels[size:])] if held > size else []
            held -= size
    if held:
        images, labels = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
        yield _pinned(images, pin_memory), labels


def _pinned(images: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    return images.pin_memory() if pin_memory and torch.cuda.is_available() else images


class StreamEpochs:
    """A streaming peer's loader, once per epoch: tells the workers the epoch, then yields
    (images, labels) of `batch_size` (the last batch partial). `dataloader` is the torch
    DataLoader inside the library's pipeline, whose workers `close` stops."""

    def __init__(self, loader, order, batch_size: int, epoch: SharedEpoch, *, dataloader,
                 keep=None, rebatch: bool, pin_memory: bool, before_epoch=None):  # fmt: skip
        self.loader, self.order, self.batch_size, self.epoch = loader, order, batch_size, epoch
        self.dataloader = dataloader
        self.keep, self.rebatch, self.pin_memory = keep, rebatch, pin_memory
        self.before_epoch = before_epoch

    def __len__(self) -> int:
        return math.ceil(len(np.unique(self.order.indices)) / self.batch_size)

    def __iter__(self):
        self.epoch.set(self.order.epoch)
        if self.before_epoch is not None:
            self.before_epoch(self.order.epoch)
        batches = (tuple(batch) for batch in self.loader)
        if self.rebatch or self.keep is not None:
            yield from rebatch(batches, self.batch_size, self.keep, self.pin_memory)
            return
        for images, labels, _ in batches:
            yield images, labels

    def close(self) -> None:
        """Stop persistent workers now. litdata's iterator holds its loader (a reference
        cycle), so otherwise the garbage collector stops them, after the queues they listen on
        are finalized: torch then waits 5 s for each worker before killing it."""
        stop_workers(self.dataloader)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass
