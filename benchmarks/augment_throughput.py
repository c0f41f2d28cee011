"""Augmentation cost in `device` access: loader-only epochs (no model) of a store's train split,
resident on the CPU, without augmentation, with `--augment flip,crop` (the batched ops of
`training/augment.py`) and with the per-image torchvision path that they replaced, measured in
one run and interleaved epoch by epoch (the machine is shared and noisy). Prints images/s per
mode (median over the timed epochs, one warm-up epoch excluded) and the ratios between them.

    loadbench convert synthetic:cifar-like -f npy -o /tmp/aug-store
    python benchmarks/augment_throughput.py /tmp/aug-store [--epochs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import loadbench
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder

NAMES = ["flip", "crop"]


class PerImageTorchvision:
    """The path the batched ops replaced: torchvision transforms v2 on one image at a time, torch's
    global RNG seeded with (seed, epoch, position) for each (flip and crop only)."""

    def __init__(self, image_shape, seed: int):
        from torchvision.transforms import v2

        h, w, _ = image_shape
        pad = max(1, min(h, w) // 8)
        crop = v2.RandomCrop((h, w), padding=pad, padding_mode="reflect")
        self.transform = v2.Compose([crop, v2.RandomHorizontalFlip()])
        self.seed = seed

    def batch(self, images, positions, copies, epoch):
        return torch.stack(
            [self._one(image, int(p), epoch) for image, p in zip(images, positions, strict=True)]
        )

    def _one(self, image, position: int, epoch: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + position)
            return self.transform(image)


def epoch_rate(batches, order: EpochOrder, epoch: int) -> float:
    order.set_epoch(epoch)
    count = 0
    t0 = time.perf_counter()
    for images, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - t0)


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}"
    except (OSError, IndexError):
        import platform

        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    store = loadbench.open_store(args.store)
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=0)
    shape = store.image_shape
    modes = {
        "none": None,
        "batched flip,crop": Augmenter(build_augment(NAMES, shape), None, seed=0),
        "per-image torchvision flip,crop": PerImageTorchvision(shape, seed=0),
    }
    batches = {
        mode: make_batches(
            store,
            "train",
            order,
            access="device",
            batch_size=args.batch_size,
            workers=0,
            pin_memory=False,
            device=torch.device("cpu"),
            augmenter=augmenter,
        )  # fmt: skip
        for mode, augmenter in modes.items()
    }
    rates = {mode: [] for mode in modes}
    for epoch in range(args.epochs + 1):  # epoch 0 warms up
        for mode, mode_batches in batches.items():
            rate = epoch_rate(mode_batches, order, epoch)
            if epoch:
                rates[mode].append(rate)

    print(f"{args.store}: {len(labels):,} train images {shape}, batch {args.batch_size}, "
          f"device access on the CPU, {torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"{cpu_model()}, {time.strftime('%Y-%m-%d %H:%M')}")
    median = {mode: statistics.median(r) for mode, r in rates.items()}
    for mode, r in rates.items():
        epochs = ", ".join(f"{x:,.0f}" for x in r)
        print(f"  {mode:32s} {median[mode]:>12,.0f} img/s  (epochs: {epochs})")
    batched, old = median["batched flip,crop"], median["per-image torchvision flip,crop"]
    print(f"  batched / per-image torchvision: {batched / old:.1f}x")
    print(f"  batched / no augmentation:       {batched / median['none']:.2f}x")


if __name__ == "__main__":
    main()
