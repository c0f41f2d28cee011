"""From a store to batches, by access mode: what the training loop iterates.

- `sample` and `batch` access go through torch's DataLoader (`loaders.py`);
- `threads` access reads and decodes in threads of the training process (`threaded.py`);
- `device` keeps the whole split resident on the device (`resident.py`);
- a reader that brings its own pipeline (a peer loader) is iterated as it is.

Every mode draws the same epoch order from (seed, epoch), and augments sample i of epoch e with
randomness seeded by (seed, epoch, i), so the access mode changes how fast a run is, never what
it learns. torch is imported by the loaders only: declaring these options imports none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.training.augment import Augmenter
from loadbench.training.order import EpochOrder
from loadbench.training.sharding import Shard

if TYPE_CHECKING:  # annotations only: a store is passed in, never opened here
    from loadbench.store import Store

ACCESS_MODES = ("sample", "batch", "threads", "device")
LOADER_OPTIONS = {
    "batch_size": Option(64, "images per batch", kind=int, above=0),
    "access": Option(
        "sample",
        "per item (Dataset), per batch (read_batch), per batch in threads of this process "
        "(as many as workers, at least one), or resident on the device",
        choices=ACCESS_MODES,
    ),
    "workers": Option(
        0, "DataLoader worker processes (threads with threads access)", kind=int, minimum=0
    ),  # fmt: skip
    "pin_memory": Option(None, "pinned host memory", kind=bool, shown="on with CUDA"),
}

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
        from loadbench.training.resident import DeviceBatches

        return DeviceBatches(store, split, order, batch_size, device, augmenter, shard)
    reader = store.new_reader(split)
    reader.device = "cpu"  # a DataLoader moves batches to the device itself (tensor format too)
    common = {"batch_size": batch_size, "workers": workers, "pin_memory": pin_memory,
              "augmenter": augmenter}  # fmt: skip
    own = reader.loader(order, access=access, **common)
    if own is not None and shard is not None:
        shutdown(own)
        raise LoadbenchError(_NOT_SHARDED.format(name=store.format_name))
    if own is not None:  # a peer loader: its library's own pipeline
        return own
    from loadbench.training.loaders import dataloader_batches

    return dataloader_batches(reader, order, access=access, shard=shard, **common)


def shutdown(batches) -> None:
    """Stop the worker processes behind `batches` (what `make_batches` returned) now."""
    close = getattr(batches, "close", None)
    if callable(close):  # RingBatches, peer loaders: they know their workers
        close()
        return
    from loadbench.training.loaders import stop_workers

    stop_workers(batches)


class FixedBatches:
    """One batch, already on the device, handed out `steps` times (the last time cut to `last`
    images, as an epoch's last batch is): what a compute-only run trains on, so that its epoch
    takes the model's time alone, as if data were free."""

    def __init__(self, images, labels, steps: int, last: int):
        self.images, self.labels, self.steps, self.last = images, labels, steps, last

    def __iter__(self):
        for step in range(self.steps):
            n = self.last if step == self.steps - 1 else len(self.labels)
            yield self.images[:n], self.labels[:n]

    def __len__(self) -> int:
        return self.steps
