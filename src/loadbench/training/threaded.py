"""`threads` access: batches read and decoded by threads of the training process.

Thread t of T makes batches t, t + T, t + 2T, ... of an epoch, as DataLoader worker t would:
it reads (decodes) a batch into a stored-pixel array of its own, made once and reused for
every batch, converts it to float32 (N, C, H, W) and augments it with `Augmenter.batch`, then
hands it to the training loop through a queue of its own, at most `PREFETCH` batches ahead.
The loop takes batch k from thread k % T, so batches come in the epoch's order, the same
images and pixels as `sample` and `batch` access give.

Threads share one process and its GIL: they add speed only where the work releases it. The
JPEG decoders (libjpeg-turbo through ctypes or torch's op), NumPy's float conversion, torch's
augmentation ops and file reads do; Python's per-image bookkeeping does not, so small images
gain little over one thread, and large ones (decoding is most of their time) gain most.
`benchmarks/fast_paths.py` measures where each access mode wins.

Each thread opens its own reader (a copy of the split's reader: handles, chunk caches and
memory maps of its own), counts its work in a stage-counter row of its own, and stops within
one piece of a batch (`PIECE_BYTES` of stored pixels) when the epoch is left (its end, `break`,
an error, Ctrl-C) or the loader is closed: `close` and the end of every epoch leave no thread
running. An error in a thread is raised in the training loop as the thread raised it.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from loadbench import stages
from loadbench.formats.base import SplitReader
from loadbench.formats.pixels import DTYPES, to_tensor
from loadbench.training.augment import Augmenter, augment_batch

_POLL_S = 0.05  # how often a thread blocked on a full queue looks whether the epoch was left


class _Stopped(Exception):
    """The epoch was left: a thread ends without making the rest of its batches."""


class ThreadedBatches:
    """`threads` access over the batches of a `BatchSampler` (an epoch's draws, as the other
    access modes iterate them), with `threads` threads."""

    PREFETCH = 2  # finished batches a thread may hold before the loop takes them
    # Stored bytes read, then converted, between two looks at whether the epoch was left: a
    # piece stays in the cache (L2/L3) from its decoding to its conversion.
    PIECE_BYTES = 4 << 20

    def __init__(self, reader: SplitReader, batches: torch.utils.data.BatchSampler, *,
                 batch_size: int, threads: int, pin_memory: bool,
                 augmenter: Augmenter | None,
                 counters: stages.StageCounters | None = None):  # fmt: skip
        self.reader, self.batches, self.batch_size = reader, batches, batch_size
        self.threads = max(1, threads)
        self.augmenter, self.pin_memory = augmenter, pin_memory
        self.stages = counters
        self._readers: list[SplitReader] = []
        self._epoch: _Epoch | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.close()  # an epoch left unfinished before is stopped first
        if not self._readers:  # opened here, one after another: LMDB refuses a race
            copies = [copy.copy(self.reader) for _ in range(self.threads - 1)]
            for reader in (self.reader, *copies):
                _ = reader.handle
            self._readers = [self.reader, *copies]
        epoch = self._epoch = _Epoch(self, list(self.batches))
        try:
            yield from epoch
        finally:
            epoch.stop()

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Stop the threads of an epoch still running; they are joined before this returns."""
        epoch, self._epoch = self._epoch, None
        if epoch is not None:
            epoch.stop()

    def counters(self, thread: int):
        return self.stages.for_thread(thread) if self.stages is not None else stages.UNCOUNTED


class _Epoch:
    """One pass over `batches` (lists of sampler keys): the threads and their queues."""

    def __init__(self, owner: ThreadedBatches, batches: list):
        self.owner, self.batches = owner, batches
        self.stopping = threading.Event()
        count = min(owner.threads, len(batches))
        self.queues = [queue.Queue(maxsize=owner.PREFETCH) for _ in range(count)]
        self.threads = [
            threading.Thread(
                target=self._work, args=(t,), name=f"loadbench-threads-{t}", daemon=True
            )  # fmt: skip
            for t in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def __iter__(self):
        main = self.owner.stages if self.owner.stages is not None else stages.UNCOUNTED
        for number in range(len(self.batches)):
            kind, value = self.queues[number % len(self.queues)].get()
            if kind == "error":
                raise value
            images, labels = value
            if self.owner.pin_memory:
                main.begin()
                images, labels = images.pin_memory(), labels.pin_memory()
                main.end(stages.COLLATE)
            yield images, labels

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()

    # -- in thread t ----------------------------------------------------------------------
    def _work(self, t: int) -> None:
        owner = self.owner
        reader, counters = owner._readers[t], owner.counters(t)
        h, w, c = reader.image_shape
        staging = np.empty((owner.batch_size, h, w, c), dtype=DTYPES[reader.dtype])
        try:
            for number in range(t, len(self.batches), len(self.queues)):
                batch = self._make(reader, staging, self.batches[number], counters)
                if not self._put(t, ("batch", batch)):
                    return
        except _Stopped:
            return
        except BaseException as e:  # raised in the training loop, as the thread raised it
            self._put(t, ("error", e))

    def _make(self, reader: SplitReader, staging: np.ndarray, keys: list, counters):
        """Batch `keys`, read and converted piece by piece: a piece's stored pixels are still
        in the cache when they are converted (512x512 images: 3 ms a piece of 5)."""
        counters.begin()
        n = len(keys)
        h, w, c = reader.image_shape
        indices = reader.check_indices([key[1] for key in keys])
        labels = np.empty(n, dtype=np.int64)
        images = torch.from_numpy(np.empty((n, c, h, w), dtype=np.float32))
        piece = max(1, self.owner.PIECE_BYTES // max(1, staging[0].nbytes))
        for lo in range(0, n, piece):
            if self.stopping.is_set():
                counters.end(stages.READ)
                raise _Stopped
            hi = min(lo + piece, n)
            labels[lo:hi] = reader.read_batch_into(indices[lo:hi], staging[lo:hi])
            counters.lap(stages.READ)
            to_tensor(staging[lo:hi], out=images[lo:hi])
            counters.lap(stages.COLLATE)
        if self.owner.augmenter is None:
            counters.end(stages.COLLATE, n)
        else:
            images = augment_batch(images, keys, self.owner.augmenter)
            counters.end(stages.AUGMENT, n)
        return images, torch.from_numpy(labels)

    def _put(self, t: int, item) -> bool:
        """Hand `item` to the loop; False when the epoch was left first."""
        while not self.stopping.is_set():
            try:
                self.queues[t].put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
