"""Data-parallel training under torchrun: the process group, and one object all code paths use.

`torchrun --nproc-per-node N -m loadbench train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE in their environment. `setup(device)` starts the process group
from them, once per process: NCCL when the run's device is CUDA (each process on
cuda:LOCAL_RANK), Gloo otherwise. LOADBENCH_DDP_BACKEND=gloo runs CUDA ranks over Gloo instead
(ranks then share GPUs round-robin: two ranks on a one-GPU machine). Without torchrun, or with a
world of one, `Dist` is a single process whose collectives return at once, so training,
evaluation and the benchmark go through the same code either way.

Under DDP every rank computes the same things from the same seed (model, normalisation, epoch
order), trains on its shard of each epoch (`training.sharding.Shard`), and gathers what is reported:
losses, predictions and per-rank telemetry. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from loadbench.errors import LoadbenchError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# What each rank reports of an epoch, besides the telemetry window of the benchmark's sampler.
RANK_KEYS = ("time_s", "data_wait_s", "compute_s", "au", "images_per_s", "first_batch_s",
             "images")  # fmt: skip


@dataclass
class Dist:
    """This process's place in the run: rank `rank` of `world` (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def place(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK for a CUDA run under torchrun (over Gloo,
        LOCAL_RANK modulo the GPUs there are)."""
        if self.active and device.type == "cuda":
            shared = self.backend == "gloo"
            return torch.device("cuda", self.local_rank % torch.cuda.device_count() if shared
                                else self.local_rank)  # fmt: skip
        return device

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.local_rank])
            else:
                torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (picklable objects)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: tuple[float, ...]) -> tuple[float, ...]:
        """Element-wise sums over ranks, added in rank order: the same floats on every rank."""
        parts = self.all_gather_object(tuple(values))
        return tuple(sum(column) for column in zip(*parts, strict=True))

    def wrap(self, model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
        """`model` in DistributedDataParallel (which broadcasts rank 0's weights and buffers
        to every rank now), or None for a single process."""
        if not self.active:
            return None
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank. DDP broadcasts them before
        each training forward, and each rank then updates them with its own batch; after the
        last step of an epoch they differ by that step, so evaluation and saved models would."""
        if self.active:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def destroy(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.backend = None


_current: Dist | None = None


def under_torchrun() -> bool:
    return all(key in os.environ for key in ENV)


def is_main_process() -> bool:
    """Whether this process reports: always without torchrun, rank 0 under it."""
    return os.environ.get("RANK", "0") == "0"


def setup(device: torch.device) -> Dist:
    """This process's `Dist`, starting the process group on first use under torchrun."""
    global _current
    if _current is not None:
        return _current
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        _current = Dist()
        return _current
    rank, world, local_rank, local_world = (int(os.environ[key]) for key in ENV)
    backend = os.environ.get("LOADBENCH_DDP_BACKEND") or (
        "nccl" if device.type == "cuda" else "gloo"
    )
    if backend not in ("nccl", "gloo"):
        raise LoadbenchError(f"LOADBENCH_DDP_BACKEND={backend}: use nccl or gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LoadbenchError("LOADBENCH_DDP_BACKEND=nccl needs --device cuda")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise LoadbenchError(
                f"torchrun started {local_world} processes on this node but it has "
                f"{torch.cuda.device_count()} GPU(s): use --nproc-per-node "
                f"{torch.cuda.device_count()}, --device cpu, or LOADBENCH_DDP_BACKEND=gloo "
                "(ranks then share GPUs)"
            )
        torch.cuda.set_device(local_rank)
    elif device.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend)
    _current = Dist(rank, world, local_rank, local_world, backend)
    atexit.register(_current.destroy)
    if rank != 0:  # rank 0 alone prints progress bars and epoch lines
        from loadbench import progress

        progress.console.quiet = True
    return _current


def gather_epoch(dist: Dist, record: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """An epoch's record with every rank's part under `ranks` (world > 1).

    `record` is this rank's epoch, `extra` its telemetry window (or nothing). The result keeps
    this rank's numbers (rank 0's are the ones written), except `time_s`, the slowest rank's
    (the epoch ends when every rank is done), and `images_per_s`, the images of all ranks over
    that time; `straggler_ratio` is added.
    """
    if not dist.active:
        return {**record, **extra}
    mine = {"rank": dist.rank, **{k: record[k] for k in RANK_KEYS if k in record}, **extra}
    ranks = dist.all_gather_object(mine)
    slowest = max(r["time_s"] for r in ranks)
    images = sum(r.get("images") or 0 for r in ranks)
    world = {"time_s": slowest, "images_per_s": images / slowest if slowest > 0 else 0.0,
             "straggler_ratio": straggler_ratio(ranks)}  # fmt: skip
    return {**record, **extra, **world, "ranks": ranks}


def straggler_ratio(ranks: list[dict[str, Any]]) -> float | None:
    """Slowest rank's epoch time over the median rank's (1 = no straggler)."""
    times = [r["time_s"] for r in ranks if r.get("time_s") is not None]
    if not times:
        return None
    middle = statistics.median(times)
    return max(times) / middle if middle > 0 else None


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): equal weights, equal
    digests. Recorded per rank, it shows that DDP kept the replicas identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
