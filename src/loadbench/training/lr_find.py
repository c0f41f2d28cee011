"""The learning-rate finder (document 003; fastai's `lr_find`): raise the lr exponentially batch
after batch, record the loss, stop when it diverges, restore the weights, suggest an lr."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.training.loop import Run


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None  # the lr where the smoothed loss falls fastest
    min_loss_lr: float | None  # the lr of the lowest smoothed loss (fastai suggests a tenth)


def lr_find(
    run: Run,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
) -> LrFindResult:
    """Sweep the lr of `run`'s optimizer from start_lr to end_lr over `num_it` batches."""
    if run.dist.active:  # each rank would stop at its own loss, and DDP's steps would hang
        raise LoadbenchError("lr-find sweeps in a single process: run it without torchrun")
    model_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    optimizer_state = run.optimizer.state_dict()
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    factor = (end_lr / start_lr) ** (1 / max(1, num_it - 1))
    run.train_mode()
    epoch = 0
    batches = iter(())
    try:
        with progress.task("lr-find", num_it) as advance:
            for i in range(num_it):
                try:
                    images, labels = next(batches)
                except StopIteration:  # small datasets: go round the training set again
                    epoch += 1
                    run.train_order.set_epoch(epoch)
                    batches = iter(run.train_batches)
                    images, labels = next(batches)
                lr = start_lr * factor**i
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                images, labels = run._to_device(images, labels)
                _, loss_t = run.train_step(images, labels)
                loss = float(loss_t)
                average = beta * average + (1 - beta) * loss
                value = average / (1 - beta ** (i + 1))
                lrs.append(lr)
                losses.append(loss)
                smoothed.append(value)
                advance(1)
                best = min(best, value)
                if not math.isfinite(value) or value > diverge * best:
                    break
    finally:
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(optimizer_state)
    suggestion, min_loss_lr = suggest(lrs, smoothed)
    return LrFindResult(lrs, losses, smoothed, suggestion, min_loss_lr)


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(steepest-descent lr, lowest-loss lr) of the smoothed curve.

    The first tenth of the sweep (noise while nothing is learnt) and the last few points (the
    divergence that ended it) are not candidates. No falling stretch: no suggestion.
    """
    values = np.asarray(smoothed, dtype=float)
    keep = int(np.argmax(~np.isfinite(values))) if not np.isfinite(values).all() else len(values)
    values, log_lr = values[:keep], np.log10(np.asarray(lrs[:keep], dtype=float))
    if len(values) < 5:
        return None, None
    lowest = float(lrs[int(np.argmin(values))])
    first, last = len(values) // 10, len(values) - max(1, len(values) // 20)
    slope = np.gradient(values, log_lr)[first:last]
    if len(slope) == 0 or slope.min() >= 0:
        return None, lowest
    return float(lrs[first + int(np.argmin(slope))]), lowest


def write_lr_find(result: LrFindResult, out: str) -> str:
    """`lr_find.csv` (lr, loss, smoothed loss per batch) and `lr_find.png` into `out`; returns
    the plot's path."""
    import csv
    import os

    from loadbench.training.plots import plot_lr_find
    from loadbench.util import atomic_file

    os.makedirs(out, exist_ok=True)
    with atomic_file(os.path.join(out, "lr_find.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.lrs, result.losses, result.smoothed, strict=True))
    png = plot_lr_find(result.lrs, result.losses, os.path.join(out, "lr_find.png"),
                       suggestion=result.suggestion, smoothed=result.smoothed)  # fmt: skip
    return str(png)


def describe(result: LrFindResult) -> str:
    """The suggestion in one sentence (or why there is none)."""
    if result.suggestion is None:
        return (
            "no lr to suggest: the loss did not fall anywhere in the sweep; try a wider range "
            "or more --iterations"
        )
    return (
        f"suggested lr {result.suggestion:.3g} (steepest descent; lowest loss at "
        f"{result.min_loss_lr:.3g}, a tenth of it is {result.min_loss_lr / 10:.3g})"
    )
