"""How a training epoch is timed without changing what it times.

Real PyTorch training queues a step's kernels and fetches the next batch while the device
computes. Reading the loss (`float(loss)`) or synchronising after every step removes that
overlap: on a GPU the epoch then takes load + compute instead of about max(load, compute), and
the whole load time shows as stall. So by default (`timing: overlap`) nothing inside the epoch
waits for the device: losses and correct counts add up on the device (`DeviceTotals`), each
step's device time comes from a pair of CUDA events, and both are read after the epoch's one
synchronisation. `timing: sync` synchronises after every step instead: load and compute are
then measured apart (the serial breakdown), at the price of the overlap.

On the CPU the two agree: a step's work is done when its call returns, so its host time is its
compute time, and `DataLoader` workers load the next batches meanwhile either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from loadbench.training.metrics import EpochMeter


class StepClock:
    """The data wait, compute time and utilisation of one epoch's steps.

    `data_wait_s` is host time blocked on the next batch, the host-to-device copy included when
    it blocks (a copy from pageable memory does; one from pinned memory does not). `compute_s`
    is device time from CUDA events under overlap timing on CUDA, else each step's host time
    (with a synchronisation at its end under sync timing).
    """

    def __init__(self, device: torch.device, timing: str = "overlap"):
        self.device, self.timing = device, timing
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.data_wait_s = 0.0
        self._host_compute_s = 0.0

    def waited(self, seconds: float) -> None:
        self.data_wait_s += seconds

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time the work queued inside the block as one step."""
        if self.cuda and self.timing == "overlap":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            return
        started = time.perf_counter()
        yield
        if self.cuda:  # sync timing: the step's device work is done before the next batch
            torch.cuda.synchronize(self.device)
        self._host_compute_s += time.perf_counter() - started

    def finish(self) -> None:
        """The epoch's end: wait for the device once, so the wall time holds all its work."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def compute_s(self) -> float:
        """Seconds of compute in the epoch (call after `finish`)."""
        if self.events:
            return sum(start.elapsed_time(end) for start, end in self.events) / 1000
        return self._host_compute_s


class DeviceTotals:
    """An epoch's loss sum and correct count, kept where the model computes them and read once
    at the epoch's end: reading them every step would synchronise the host with the device."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: its mean `loss` (0-d), its `logits` (N, C) and class `labels` (N,)."""
        n = int(labels.shape[0])  # a shape: known on the host, no synchronisation
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.argmax(1) == labels).sum()
        self.count += n

    def meter(self) -> EpochMeter:
        """The totals as an `EpochMeter` (this reads them from the device)."""
        return EpochMeter.from_totals(float(self.loss_sum), int(self.correct), self.count)
