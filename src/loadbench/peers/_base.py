"""What every peer loader declares and decides before its library runs (no torch here)."""

from __future__ import annotations

from typing import Any

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats.base import Format
from loadbench.util import cpu_budget  # the threads a thread-based peer gets

__all__ = ["PeerFormat", "cpu_budget", "epoch_seed", "loader_args", "refuse_balance", "subset"]


class PeerFormat(Format):
    """A format whose reader's `loader()` is another project's own pipeline."""

    peer = True
    accesses = ("sample",)  # peers run their own pipeline, one sample at a time
    dtypes = ("uint8",)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed a streaming peer's shuffle gets for an epoch."""
    return (seed * 1_000_003 + epoch) % (1 << 31)


def loader_args(workers: int, pin_memory: bool) -> dict[str, Any]:
    """A DataLoader's worker settings, as the peers' documentation uses them."""
    return {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}


def refuse_balance(order, name: str) -> None:
    """Streaming peers draw in their library's order, so they cannot balance classes."""
    if order.balance != "none":
        raise LoadbenchError(
            f"{name} streams in its library's own order, so it cannot draw balance="
            f"{order.balance}; use balance none, or a map-style peer (torchvision-imagefolder, "
            "hf-datasets) or a loadbench format"
        )


def subset(order, count: int) -> np.ndarray | None:
    """The indices an epoch keeps, or None when it is the whole split."""
    indices = np.unique(order.indices)
    if len(indices) == count:
        return None
    return indices
