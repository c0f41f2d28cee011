"""What counting a loader's stages costs: loader-only epochs with the counters on and off.

Every `sample` and `batch` loader counts where its time goes (`loadbench/stages.py`): a few
clock reads per batch, and per image only where an image is decoded or augmented. This measures
images/s of loader-only epochs (no model, workers 0, one torch thread) over an npy store (the
cheapest image to read, so the counters' share is largest) and a files-jpeg store, with
counting on and off (`stages.ENABLED`, read when a loader is made), epochs of the two loaders
interleaved so that a busy neighbour hits both alike. Each rate is the best of `--repeats`
epochs, by wall time and by this process's CPU time; `on/off` is the rate with counting over
the rate without (1.00: free; 0.98: 2% slower), of the best epochs and as the median of the
ratios of the epochs run side by side.

    python benchmarks/stage_overhead.py [--count 20000] [--repeats 15] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs

import loadbench
from loadbench import stages
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder

FORMATS = ("npy", "files-jpeg")
ACCESSES = ("sample", "batch")


def loader(store, order, access: str, batch_size: int, counting: bool):
    stages.ENABLED = counting
    return make_batches(
        store, "train", order, access=access, batch_size=batch_size, workers=0,
        pin_memory=False, device="cpu", augmenter=None,
    )  # fmt: skip


def epoch(batches, order, number: int) -> tuple[float, float]:
    """(wall s, CPU s) of one loader-only epoch."""
    order.set_epoch(number)
    wall, cpu = time.perf_counter(), time.process_time()
    for images, _ in batches:
        images.to("cpu")
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(store, access: str, batch_size: int, repeats: int) -> dict[bool, np.ndarray]:
    """Images/s (wall, CPU) of each epoch of each setting, epochs interleaved (on, off, off,
    on, ...): `repeats` rows per setting, the same epoch order in a row."""
    n = store.counts["train"]
    order = EpochOrder(np.arange(n), np.zeros(n, dtype=np.int64), seed=0)
    loaders = {on: loader(store, order, access, batch_size, on) for on in (True, False)}
    for batches in loaders.values():  # warm: page cache, decoder import, allocator
        epoch(batches, order, 1)
    rates = {on: np.empty((repeats, 2)) for on in loaders}
    for r in range(repeats):
        for on in (True, False) if r % 2 == 0 else (False, True):
            rates[on][r] = [n / t for t in epoch(loaders[on], order, r + 2)]
    for batches in loaders.values():
        shutdown(batches)
    stages.ENABLED = True
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="32x32 images in the store")
    parser.add_argument("--repeats", type=int, default=15, help="epochs per setting")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, one torch thread, workers 0")
    print(f"command: python {shlex.join(sys.argv)}")
    source = loadbench.load_source(f"synthetic:cifar-like?count={args.count}&eval_count=0")
    print(f"{'':19} {'best epoch, img/s':^29} {'on/off, median pair':^20}")
    print(f"{'format':<11} {'access':<7} {'on':>9} {'off':>9} {'on/off':>9} {'wall':>9} "
          f"{'CPU':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        for name in FORMATS:
            store = loadbench.convert(source, name, os.path.join(root, name))
            for access in ACCESSES:
                rates = measure(store, access, args.batch_size, args.repeats)
                on, off = rates[True].max(0)[0], rates[False].max(0)[0]
                pairs = np.median(rates[True] / rates[False], axis=0)
                print(f"{name:<11} {access:<7} {on:>9,.0f} {off:>9,.0f} {on / off:>9.3f} "
                      f"{pairs[0]:>9.3f} {pairs[1]:>9.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
