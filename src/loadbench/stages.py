"""Where a loader's time goes: reading, decoding, collating, augmenting and the host-to-device
copy, in nanoseconds summed over the loader's processes, with the bytes read and the images.

What each stage holds:
- `read`: the reader's calls (`read`, `read_batch`), their decoding taken out. Formats whose
  library decompresses inside its read (compressed hdf5, zarr codecs) count that as read. In
  `sample` access it holds the per-item `Dataset` calls too: timing each image would cost ~2% of
  an npy image's time, so a batch's items are timed together.
- `decode`: `codecs.decode` of JPEG or PNG bytes (files-*, webdataset, tfrecord), wherever a
  reader calls it: it adds to the loader whose batch its thread works on (`counting()`).
- `collate`: the conversion to float32 (N, C, H, W), stacking items into a batch, the copy
  into a worker's ring slot and out of it, pinning by the ring. In `batch` access the tensor
  format gathers and converts in one call (its split is in memory): all of it is collate.
- `augment`: the augmenter's calls, with the float conversion of the image each one receives.
- `h2d`: the copy to the device, measured by a caller that measures it (`add`); None else.
- `bytes_read`: in a batch that decodes, the encoded bytes decoded (a file's bytes for files-*,
  a record's image payload for webdataset and tfrecord); in any other, the stored bytes of its
  images (H x W x C x the dtype's size), however the format reads them (memory map, LMDB, h5py,
  zarr chunks: a chunk read for one image counts that image only).

Counted nowhere: torch's DataLoader's own work per batch (its loop, profiler hooks, pinning
with 0 workers) and the sampler's per image, about 60 us a batch of 64 here: with 0 workers the
stages held 78-86% of an npy epoch at 130-230k images/s, 97-99% of a files-jpeg one
(2026-12-05, 2-core Xeon).

Counts cross DataLoader workers as `CacheCounters` do: a small int64 tensor in shared memory
with a row per process (0: the main process, 1 + id: a worker), made before the workers start.
A process adds to Python ints and moves them into its row once per batch (`end`). A loader's
threads (`threads` access) count as workers do, each in a row of its own (`for_thread`). Setting
`LOADBENCH_STAGES=0` (or `ENABLED = False` before a loader is made) makes loaders count nothing.
"""

from __future__ import annotations

import os
import threading
from time import perf_counter_ns
from typing import Any

FIELDS = ("read_ns", "decode_ns", "collate_ns", "augment_ns", "h2d_ns", "bytes_read", "items")
READ, DECODE, COLLATE, AUGMENT, H2D, BYTES, ITEMS = range(len(FIELDS))
STAGE_KEYS = ("read_s", "decode_s", "collate_s", "augment_s", "h2d_s")  # as records name them
SLOTS = 65  # the main process and up to 64 DataLoader workers count apart

ENABLED = os.environ.get("LOADBENCH_STAGES", "1") != "0"

# The counters of the loader whose batch this thread is working on: decode time goes there.
_working = threading.local()


def counting() -> StageCounters | None:
    """The counters of the batch this thread is working on, if any (a decoder adds to them)."""
    return getattr(_working, "counters", None)


class StageCounters:
    """One loader's stage times, bytes and images, in every process that works for it.

    A batch's work is timed as laps: `begin` starts the clock, each `lap(stage)` gives the
    time since the last lap to a stage, `end` gives the rest to the last stage and counts the
    batch. Decoding inside a lap is taken out of it (`decoded`).
    """

    def __init__(self, item_bytes: int):
        import torch

        self.table = torch.zeros((SLOTS, len(FIELDS)), dtype=torch.int64)
        self.table.share_memory_()
        self.item_bytes = item_bytes  # the stored bytes of one image
        self.h2d_measured = False
        self._reset()

    def _reset(self) -> None:
        self._rows = self.table.numpy()  # the same shared memory, cheaper to add to
        self._pending = [0] * len(FIELDS)  # this process's counts not yet in its row
        self._decoded = 0  # images the batch decoded (their bytes are counted as they are)
        self._mark = 0
        self._pid: int | None = os.getpid()  # made in the main process, whose row is 0
        self._row = 0

    def __getstate__(self) -> dict[str, Any]:  # for workers that are spawned, not forked
        return {"table": self.table, "item_bytes": self.item_bytes, "h2d_measured": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()
        self._pid = None

    # -- a batch, in the process that makes it ------------------------------------------------
    def begin(self) -> None:
        if os.getpid() != self._pid:  # a worker's first batch
            self._adopt()
        _working.counters = self
        self._mark = perf_counter_ns()

    def lap(self, stage: int) -> None:
        now = perf_counter_ns()
        self._pending[stage] += now - self._mark
        self._mark = now

    def decoded(self, ns: int, nbytes: int) -> None:
        """An image decoded from `nbytes` in `ns`, inside the lap now running."""
        pending = self._pending
        pending[DECODE] += ns
        pending[BYTES] += nbytes
        self._decoded += 1
        self._mark += ns  # the lap it happened in leaves it out

    def count(self, images: int) -> None:
        """The images of a batch; a batch that decoded none counts their stored bytes."""
        self._pending[ITEMS] += images
        if not self._decoded:
            self._pending[BYTES] += images * self.item_bytes
        self._decoded = 0

    def end(self, stage: int, images: int = 0) -> None:
        """The batch is done: the time since the last lap goes to `stage`; a worker moves its
        counts into its row now (the main process's are moved by `snapshot`)."""
        self.lap(stage)
        if images:
            self.count(images)
        _working.counters = None
        if self._row:
            self._flush()

    def add(self, stage: int, value: int) -> None:
        """Add to a stage outside a batch (the host-to-device copy, measured by its caller)."""
        self._pending[stage] += value
        if stage == H2D:
            self.h2d_measured = True

    def for_thread(self, number: int) -> StageCounters:
        """Counters for thread `number` of a loader in this process: the same table, a row of
        their own (as worker `number` would have), laps and pending counts of their own."""
        view = object.__new__(StageCounters)  # not copy.copy: __setstate__ is a spawned worker's
        view.__dict__.update(self.__dict__)
        view._pending = [0] * len(FIELDS)
        view._decoded = 0
        view._row = 1 + number % (SLOTS - 1)
        return view

    def _adopt(self) -> None:
        """This process's row; counts a forked worker inherited from its parent are not its."""
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        self._pid = os.getpid()
        self._row = 0 if info is None else 1 + info.id % (SLOTS - 1)
        self._pending = [0] * len(FIELDS)
        self._decoded = 0

    def _flush(self) -> None:
        self._rows[self._row] += self._pending
        self._pending = [0] * len(FIELDS)

    # -- reading them, in the main process ---------------------------------------------------
    def snapshot(self) -> list[int]:
        """Every field summed over the processes, now (called in the main process)."""
        self._flush()
        return [int(v) for v in self._rows.sum(0)]

    def since(self, snapshot: list[int], now: list[int] | None = None) -> dict[str, Any]:
        """Seconds per stage, bytes and images from `snapshot` to `now` (default: now), as an
        epoch's record has them."""
        now = self.snapshot() if now is None else now
        d = [b - a for a, b in zip(snapshot, now, strict=True)]
        seconds = dict(zip(STAGE_KEYS, (ns / 1e9 for ns in d[: H2D + 1]), strict=True))
        if not self.h2d_measured:
            seconds["h2d_s"] = None
        return {**seconds, "bytes_read": d[BYTES], "items": d[ITEMS]}


class StageWindow:
    """A loader's counts epoch by epoch, for its records; nothing for a loader that counts none
    (device access and peer loaders have no `stages`)."""

    def __init__(self, batches):
        self.counters: StageCounters | None = getattr(batches, "stages", None)
        self.since = self.counters.snapshot() if self.counters is not None else None

    def copied(self, ns: int) -> None:
        """A batch's host-to-device copy took `ns` (measured by the caller)."""
        if self.counters is not None:
            self.counters.add(H2D, ns)

    def window(self) -> dict[str, Any]:
        """{"stages": the counts since the last window}, or {} without counters."""
        if self.counters is None:
            return {}
        now = self.counters.snapshot()
        counts, self.since = self.counters.since(self.since, now), now
        return {"stages": counts}


def new_counters(item_bytes: int) -> StageCounters | None:
    """Counters for a new loader, or None when counting is off (`ENABLED`)."""
    return StageCounters(item_bytes) if ENABLED else None


def lap(stage: int) -> None:
    """A lap of the batch this thread is working on, if any (for readers: `counting()`)."""
    counters = counting()
    if counters is not None:
        counters.lap(stage)


def end(stage: int) -> None:
    """`StageCounters.end` of the batch this thread is working on, if any."""
    counters = counting()
    if counters is not None:
        counters.end(stage)


class Uncounted:
    """What a loader without counters calls: nothing is counted."""

    def begin(self) -> None:
        _working.counters = None  # decoding in this batch counts for no other loader

    def lap(self, stage: int) -> None:
        pass

    def count(self, images: int) -> None:
        pass

    def end(self, stage: int, images: int = 0) -> None:
        pass


UNCOUNTED = Uncounted()
