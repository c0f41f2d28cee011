"""The training harness's quality bar, measured: what a few CPU epochs reach on cifar-like data.

Prints, per model, the held-out accuracy after each epoch and the mean epoch time, so the README
can quote real numbers. Compare within one run: the machine is shared and noisy.

    python benchmarks/training.py [--count 5000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile

import loadbench
from loadbench.training.config import TrainConfig
from loadbench.training.train import train

SETTINGS = {
    # document 004's minimal net with the assignment's optimizer
    "cnn-tiny (sigmoid), SGD 0.001 m0.9": {"model": "cnn-tiny", "optimizer": "sgd", "lr": 0.001},
    "cnn-tiny (sigmoid), Adam 0.001": {"model": "cnn-tiny", "optimizer": "adam"},
    "cnn-blocks 20,40,80,160 ReLU + BN": {"model": "cnn-blocks", "batch_norm": True},
    "cnn-blocks 20,40,80,160 ReLU": {"model": "cnn-blocks"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="training images")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    spec = f"synthetic:cifar-like?count={args.count}&eval_count={args.count // 5}"
    store = loadbench.store.MemoryStore(loadbench.load_source(spec))
    print(f"{spec}: {args.epochs} epochs, batch 64, CPU threads as the machine gives")
    for name, options in SETTINGS.items():
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(data=spec, epochs=args.epochs, out=out, **options)
            result = train(cfg, store)
        accuracies = " ".join(f"{r['val_accuracy']:.3f}" for r in result.history)
        mean_time = sum(r["time_s"] for r in result.history) / len(result.history)
        print(f"{name:38s} test accuracy by epoch: {accuracies}   {mean_time:.1f} s/epoch")


if __name__ == "__main__":
    main()
