"""`grain`: Grain (google/grain) reading the `arrayrecord` format's shards, the way Grain's
documentation loads ArrayRecord files with its `Dataset` API:
`grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shards))`, a `map` that parses each
record, `.batch(b)`, `.to_iter_dataset(grain.ReadOptions(...))` and `.mp_prefetch(...)` for worker
processes.
https://google-grain.readthedocs.io/en/latest/tutorials/data_sources/arrayrecord_data_source_tutorial.html
https://google-grain.readthedocs.io/en/latest/tutorials/dataset_basic_tutorial.html

Order: exactly loadbench's. In place of Grain's `.shuffle(seed)` the source goes through
`grain.MapDataset.select_from_datasets`, Grain's way of choosing which element comes at which
index, with a selection map that is `EpochOrder.draw()`. So every `balance` mode and subset
works, and augmentation is seeded by (seed, epoch, position) as with loadbench's formats.

Epochs: as Grain's docs describe, index `e * n + p` of a `MapDataset` of n elements is element
p of its e-th epoch; the pipeline is repeated, and one iterator serves epoch after epoch, so
Grain's worker processes start once, like a DataLoader's persistent workers. Batches are made
inside the `MapDataset` (before the workers slice it), so whole batches come back in order.

CPU budget: `workers` worker processes (`mp_prefetch`; none with 0 workers: Grain then runs in
the loading process), and `cpu_budget(workers)` read threads in all (`ReadOptions`).
"""

from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np

from loadbench.formats.arrayrecord import (
    READ_ERRORS,
    ArrayRecordFormat,
    ArrayRecordReader,
    ArrayRecordShardWriter,
)
from loadbench.formats.base import register_format
from loadbench.peers._base import PeerFormat, cpu_budget

PREFETCH_BATCHES = 2  # per process, like a DataLoader's prefetch_factor


class _NoJaxNote(logging.Filter):
    """Grain logs, on import, that JAX's profiler is missing: true and beside the point here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load jax profiler")


def _import_grain():
    absl = logging.getLogger("absl")
    note = _NoJaxNote()
    absl.addFilter(note)
    try:
        import grain
    finally:
        absl.removeFilter(note)
    return grain


class EpochDraws:
    """A Grain `DatasetSelectionMap` over loadbench's epochs: index e * n + p is (source 0,
    store index at position p of epoch `first_epoch + e`). Each process draws an epoch once."""

    def __init__(self, order, first_epoch: int):
        self.order, self.first_epoch = copy.copy(order), first_epoch
        self.n = len(order)
        self._drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(store indices, copy flags) of an epoch: drawn by a copy of the order, so that read
        threads working on two epochs at once never share one."""
        drawn = self._drawn.get(epoch)
        if drawn is None:
            order = copy.copy(self.order)
            order.set_epoch(epoch)
            drawn = order.draw()
            kept = {e: d for e, d in self._drawn.items() if e >= epoch - 1}
            self._drawn = {**kept, epoch: drawn}  # one assignment: readers see either dict
        return drawn

    def __getitem__(self, index: int) -> tuple[int, int]:
        epoch, position = divmod(int(index), self.n)
        return 0, int(self.draw(self.first_epoch + epoch)[0][position])


class CheckedSource:
    """Grain's `ArrayRecordDataSource`, whose read errors (array_record's RuntimeError for a
    damaged shard) become loadbench's damaged-store error naming the shard."""

    def __init__(self, source, reader: ArrayRecordReader):
        self.source, self.reader = source, reader

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self.source[index]
        except READ_ERRORS as e:
            raise self.reader.shard_damaged(int(index) // self.reader.shard_size, e) from None

    def __repr__(self) -> str:
        return f"CheckedSource({self.source!r})"


class ParseRecord:
    """Grain `map_with_index` on records: (index, record bytes) -> (stored uint8 H, W, C, label);
    a damaged record is loadbench's damaged-store error naming its shard."""

    def __init__(self, reader: ArrayRecordReader, draws: EpochDraws):
        self.reader, self.draws = reader, draws

    def __call__(self, index: int, record: bytes):
        store_index = self.draws[index][1]
        image, label = self.reader.decode(record, store_index // self.reader.shard_size)
        return image, np.int64(label)


class ModelBatch:
    """Grain `map_with_index` on batches: (batch index, (uint8 N, H, W, C, labels)) -> (float32
    N, C, H, W in [0, 1], labels as a list), augmented by (seed, epoch, position) in the worker.

    Labels travel as a list: as an array, each batch's labels took a shared-memory block of
    their own, and Grain left one of them behind after `close()` (2 KiB, until exit).
    """

    def __init__(self, draws: EpochDraws, batch_size: int, augmenter):
        self.draws, self.batch_size, self.augmenter = draws, batch_size, augmenter
        self.batches = math.ceil(draws.n / batch_size)  # per epoch

    def __call__(self, index: int, batch):
        images, labels = batch
        if self.augmenter is None:  # numpy: no torch in the workers (bit-equal to to_tensor)
            floats = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
            return floats, labels.tolist()
        from loadbench.formats.pixels import to_tensor

        epoch, first = divmod(int(index), self.batches)
        epoch += self.draws.first_epoch
        positions = np.arange(len(labels)) + first * self.batch_size
        copies = self.draws.draw(epoch)[1][positions]
        augmented = self.augmenter.batch(to_tensor(images), positions, copies, epoch)
        return augmented.numpy(), labels.tolist()


class GrainEpochs:
    """The `grain` loader: (float32 images N, C, H, W, int64 labels N) batches of each epoch,
    from one Grain iterator kept from epoch to epoch while the epochs follow each other."""

    def __init__(self, reader, order, batch_size: int, workers: int, pin_memory: bool,
                 augmenter):  # fmt: skip
        self.reader, self.order, self.batch_size = reader, order, batch_size
        self.workers, self.pin_memory, self.augmenter = workers, pin_memory, augmenter
        self.iterator = None
        self.next_epoch: int | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def dataset(self, first_epoch: int):
        """Grain's pipeline over every epoch from `first_epoch` on."""
        grain = _import_grain()
        draws = EpochDraws(self.order, first_epoch)
        source = grain.MapDataset.source(CheckedSource(self.reader.handle["source"], self.reader))
        ds = (
            grain.MapDataset.select_from_datasets([source], draws)
            .map_with_index(ParseRecord(self.reader, draws))
            .batch(self.batch_size)
            .map_with_index(ModelBatch(draws, self.batch_size, self.augmenter))
            .repeat()
        )
        processes = max(1, self.workers)
        threads = max(1, cpu_budget(self.workers) // processes)  # per process
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=PREFETCH_BATCHES)
        )
        if self.workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return ds

    def __iter__(self):
        import torch

        epoch = self.order.epoch
        if not len(self):
            return
        if self.iterator is None or epoch != self.next_epoch:
            self.close()
            self.iterator = iter(self.dataset(epoch))
        self.next_epoch = None  # a pass left unfinished leaves the stream mid-epoch
        for _ in range(len(self)):
            images, labels = next(self.iterator)
            if self.workers:  # copied out of the worker's shared memory, which Grain frees now
                images = np.array(images)
            images = torch.from_numpy(images)
            if self.pin_memory and torch.cuda.is_available():
                images = images.pin_memory()
            yield images, torch.as_tensor(labels, dtype=torch.int64)
        self.next_epoch = epoch + 1

    def close(self) -> None:
        """Stop Grain's worker processes and read threads now (its docs ask for `close()`
        rather than leaving it to the garbage collector)."""
        iterator, self.iterator = self.iterator, None
        self.next_epoch = None
        if iterator is not None:
            iterator.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


class GrainReader(ArrayRecordReader):
    """Random access through Grain's `ArrayRecordDataSource` over the split's shards."""

    def _open(self):
        handle = super()._open()
        grain = _import_grain()
        paths = [self.files.local_path(name) for name in self.shard_names]
        what = f"the {self.split} shards"
        try:  # it opens every shard to count its records
            source = grain.sources.ArrayRecordDataSource(paths)
        except READ_ERRORS as e:
            raise self._damaged(what, e) from None
        if len(source) != self.count:
            raise self._damaged(what, f"{len(source)} readable records, not {self.count}")
        handle["source"] = source
        return handle

    def read_items(self, indices):
        out = self._empty(len(indices))
        labels = np.empty(len(indices), dtype=np.int64)
        try:
            records = self.handle["source"].__getitems__(indices.tolist())
        except READ_ERRORS as e:
            raise self._damaged(f"the {self.split} shards", e) from None
        for k, (index, record) in enumerate(zip(indices, records, strict=True)):
            out[k], labels[k] = self.decode(record, int(index) // self.shard_size)
        return out, labels

    def close(self):
        handle = self._handle
        mine = handle is not None and self._pid == os.getpid()
        super().close()
        if mine:
            handle["source"].__exit__(None, None, None)  # closes its shard readers

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        return GrainEpochs(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class GrainPeer(PeerFormat, ArrayRecordFormat):
    name = "grain"
    summary = "peer: Grain MapDataset over ArrayRecordDataSource (arrayrecord shards), mp_prefetch"
    requires = ("grain", "array_record")
    install = "grain"
    # The arrayrecord format's shards and options, byte for byte (raw pixels by default).
    writer_class = ArrayRecordShardWriter
    reader_class = GrainReader
