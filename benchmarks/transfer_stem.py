"""Which ResNet stem transfers pretrained weights to small images? Measured on CPU, in one run.

Pretrains a resnet18 with the ImageNet stem on a synthetic 96 px source, saves its state dict,
then transfers it to a different 32 px task (other colours, other class count) with a frozen
backbone, training only the new head, with each stem that uses the file's 7x7 conv1:

- stride1: the 7x7 conv1 at stride 1, no max-pool (layer1 sees 32x32);
- upsample: images resized to 96 px, then the ImageNet stem (what the backbone was trained on);
- imagenet: the ImageNet stem on the 32 px images as they are (layer1 sees 8x8), a reference;
- small without weights: a fresh 3x3 stem and the whole model trained, the no-transfer reference.

Prints held-out accuracy after each epoch and the mean training seconds per epoch, with the date,
machine and command. `--stem auto` with weights picks the better of stride1 and upsample here.
Everything goes through `loadbench.training.train.train`, as `loadbench train` runs it.

    python benchmarks/transfer_stem.py [--pretrain-count 1500] [--pretrain-epochs 4]
                                       [--count 600] [--eval-count 400] [--epochs 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
from typing import Any

import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs

import loadbench
from loadbench.training.config import TrainConfig
from loadbench.training.train import train

SETTINGS = {
    # name: (model options, whether the pretrained weights are used)
    "stride1, frozen backbone": ({"stem": "stride1", "freeze_backbone": True}, True),
    "upsample, frozen backbone": ({"stem": "upsample", "freeze_backbone": True}, True),
    "imagenet at 32 px, frozen backbone": ({"stem": "imagenet", "freeze_backbone": True}, True),
    "small, no weights, all trained": ({"stem": "small"}, False),
}


def run(spec: str, store, epochs: int, seed: int, **options) -> tuple[list[float], float, Any]:
    """(held-out accuracy by epoch, mean training seconds per epoch, the network)."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data=spec, model="resnet18", epochs=epochs, seed=seed, out=out, **options
        )
        result = train(config, store)
    # the held-out split: val where the source has one, else test
    accuracies = [r.get("val_accuracy", r.get("test_accuracy")) for r in result.history]
    seconds = sum(r["time_s"] for r in result.history) / len(result.history)
    return accuracies, seconds, result.model.net


def line(name: str, accuracies: list[float], seconds: float) -> str:
    by_epoch = " ".join(f"{a:.3f}" for a in accuracies)
    return f"{name:36s} {accuracies[-1]:8.3f}   {by_epoch:22s} {seconds:8.1f}"


def machine() -> str:
    model = cpu_model()
    threads = torch.get_num_threads()
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} on {threads} threads, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-count", type=int, default=1500, help="source training images")
    parser.add_argument("--pretrain-classes", type=int, default=20)
    parser.add_argument("--pretrain-size", type=int, default=96, help="source image side (px)")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--count", type=int, default=600, help="32 px training images")
    parser.add_argument("--eval-count", type=int, default=400, help="32 px test images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each transfer")
    parser.add_argument("--seed", type=int, default=0, help="of the images and the training")
    args = parser.parse_args()
    source = (
        f"synthetic:tinyimagenet-like?size={args.pretrain_size}&count={args.pretrain_count}"
        f"&eval_count={args.pretrain_count // 5}&classes={args.pretrain_classes}&seed={args.seed}"
    )
    target = (
        f"synthetic:cifar-like?count={args.count}&eval_count={args.eval_count}&classes=10"
        f"&seed={args.seed}"
    )
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {machine()}")
    print(f"command: python {shlex.join(sys.argv)}")
    source_store = loadbench.store.MemoryStore(loadbench.load_source(source))
    pretrained = run(source, source_store, args.pretrain_epochs, args.seed, stem="imagenet")
    accuracies, seconds, net = pretrained
    print(f"\npretraining: {source}, {args.pretrain_epochs} epochs, all trained")
    print(f"{'setting':36s} {'accuracy':>8s}   {'by epoch':22s} {'s/epoch':>8s}")
    print(line(f"imagenet stem at {args.pretrain_size} px", accuracies, seconds))
    target_store = loadbench.store.MemoryStore(loadbench.load_source(target))
    print(f"\ntransfer: {target}, {args.epochs} epochs, batch 64, adam 0.001")
    print(f"{'setting':36s} {'accuracy':>8s}   {'by epoch':22s} {'s/epoch':>8s}")
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "resnet18-pretrained.pt")
        torch.save(net.state_dict(), weights)
        for name, (options, pretrained) in SETTINGS.items():
            if pretrained:
                options = {**options, "weights": weights}
            accuracies, seconds, _ = run(target, target_store, args.epochs, args.seed, **options)
            print(line(name, accuracies, seconds), flush=True)


if __name__ == "__main__":
    main()
