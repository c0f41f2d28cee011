"""The learning-rate finder (document 003; fastai's `lr_find`): raise the lr exponentially batch
after batch, record the loss, stop when it diverges, restore the weights, suggest an lr.

The suggestion is fastai's "valley": about halfway down the longest fall of the smoothed loss,
which a noisy stretch of the curve cannot shift far, unlike the steepest point of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.training.loop import Run


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None  # the lr to train at (None: the loss fell nowhere)
    min_loss_lr: float | None  # the lr of the lowest smoothed loss past the noisy start
    rule: str | None = None  # what chose the suggestion: "valley" or "min/10" (see `choose_lr`)


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
    chosen = choose_lr(lrs, smoothed)
    return LrFindResult(lrs, losses, smoothed, chosen.lr, chosen.min_loss_lr, chosen.rule)


# A valley of fewer points has no inside: the valley's point would be the top of its fall.
MIN_VALLEY = 6


class Suggestion(NamedTuple):
    lr: float | None  # None: the smoothed loss fell nowhere in the sweep
    rule: str | None  # "valley" or "min/10"; None with no lr
    min_loss_lr: float | None  # the lr of the lowest smoothed loss among the candidates


def choose_lr(lrs: list[float], smoothed: list[float]) -> Suggestion:
    """The lr to train at, from the smoothed loss of a sweep, and the rule that chose it.

    Candidates are the points up to the first non-finite loss, less the first tenth (the
    smoothed loss there averages a few noisy batches, and nothing is learnt yet) and the last
    twentieth (the divergence that ended the sweep), as fastai trims them.

    - "valley" (fastai's `valley`): the longest strictly falling sequence of candidate losses,
      taken as the `L` points up to its lowest one; the lr about halfway down it (`L/3 + L/6`
      points in, as fastai counts). Noise before the real fall adds only a few points to it.
    - "min/10": when that valley has fewer than `MIN_VALLEY` points, a tenth of the lr of the
      lowest candidate loss.
    - None: the loss never falls below the first candidate's (and has no valley), or there are
      fewer than 5 candidates.
    """
    values = np.asarray(smoothed, dtype=float)
    finite = np.isfinite(values)
    keep = len(values) if finite.all() else int(np.argmin(finite))
    first, last = keep // 10, keep - max(1, keep // 20)
    values, rates = values[first:last], np.asarray(lrs[first:last], dtype=float)
    if len(values) < 5:
        return Suggestion(None, None, None)
    at_lowest = int(np.argmin(values))
    lowest = float(rates[at_lowest])
    length, end = _longest_fall(values)
    if length >= MIN_VALLEY:
        sections = length / 3
        at = end - length + int(sections) + int(sections / 2)
        return Suggestion(float(rates[at]), "valley", lowest)
    if at_lowest > 0:
        return Suggestion(lowest / 10, "min/10", lowest)
    return Suggestion(None, None, lowest)


def _longest_fall(values: np.ndarray) -> tuple[int, int]:
    """(length, index of its last point) of the first longest strictly decreasing subsequence."""
    lengths = np.ones(len(values), dtype=int)
    for i in range(1, len(values)):
        above = values[:i] > values[i]
        if above.any():
            lengths[i] = lengths[:i][above].max() + 1
    end = int(np.argmax(lengths))
    return int(lengths[end]), end


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(suggested lr, lowest-loss lr) of the smoothed curve, as `choose_lr` chooses them."""
    chosen = choose_lr(lrs, smoothed)
    return chosen.lr, chosen.min_loss_lr


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
    lowest = result.min_loss_lr
    if result.rule == "min/10":
        how = f"min/10: a tenth of the lowest-loss lr {lowest:.3g}; no valley long enough to use"
    else:
        how = f"lowest loss at {lowest:.3g}, a tenth of it is {lowest / 10:.3g}"
        if result.rule == "valley":
            how = f"valley: about halfway down the longest fall of the smoothed loss; {how}"
    return f"suggested lr {result.suggestion:.3g} ({how})"
