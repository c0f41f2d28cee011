"""A rank's part of every epoch under DDP (torchrun): which positions of the shared epoch order
it trains on, and which part of a split `device` access keeps resident."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.training.order import EpochOrder


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

    def sampler(self, length: int):
        """torch's DistributedSampler over `length` positions: padded, then rank::world.
        `shuffle=False`, because the positions index an epoch order that is shuffled already."""
        import torch.utils.data

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
