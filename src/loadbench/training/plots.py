"""PNG plots of a run: training curves, confusion matrix, learning-rate finder.

Figures are built with `matplotlib.figure.Figure`, which needs no GUI backend and no global pyplot
state, so plotting works on headless machines and from worker threads. Every file is written to
a temporary name and renamed into place, so a reader never sees half a PNG.

The curves use fixed axes (loss from 0, accuracy 0..1) so that plots of different runs can be
compared side by side, as the CIFAR-10 assignment asks ("same axis scales in all plots").
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loadbench.util import atomic_file

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

TRAIN_COLOR = "C0"
VAL_COLOR = "C1"
RAW_ALPHA = 0.3  # raw values drawn faintly under their smoothed line
MAX_ANNOTATED_CLASSES = 15
MAX_LABELLED_CLASSES = 30
DPI = 120


def smooth_ema(values: Sequence[float], factor: float) -> list[float]:
    """Bias-corrected exponential moving average, as in fastai and TensorBoard.

    A NaN stays NaN in the output and is skipped by the average, so gaps (epochs without a
    validation pass) do not poison the values after them.

    Args:
        values: the raw series.
        factor: weight of the past in [0, 1); 0 returns the values unchanged.
    """
    if not 0.0 <= factor < 1.0:
        raise ValueError(f"smoothing factor must be in [0, 1), got {factor}")
    out = []
    average, seen = 0.0, 0
    for value in values:
        value = _as_float(value)
        if math.isnan(value):
            out.append(math.nan)
            continue
        seen += 1
        average = factor * average + (1.0 - factor) * value
        # The average starts at 0; dividing by (1 - factor^n) removes that pull towards 0.
        out.append(average / (1.0 - factor**seen))
    return out


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # None, pandas.NA, anything not a number
        return math.nan


def _column(rows: list[Mapping[str, Any]], key: str) -> np.ndarray:
    """One history column as floats; missing keys, None and NA become NaN."""
    return np.array([_as_float(row.get(key)) for row in rows], dtype=np.float64)


def _history_rows(history: Sequence[Mapping[str, Any]] | pd.DataFrame) -> list[Mapping[str, Any]]:
    if hasattr(history, "to_dict"):  # a pandas DataFrame, without importing pandas here
        return history.to_dict("records")
    return list(history)


def _plot_series(ax, x, y, color: str, label: str, smooth: float) -> None:
    """Draw the finite points of one series: raw, or faint raw under the smoothed line."""
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if y.size == 0:
        return
    marker = "o" if y.size <= 30 else None
    if smooth > 0:
        ax.plot(x, y, color=color, alpha=RAW_ALPHA, linewidth=1)
        ax.plot(x, smooth_ema(y, smooth), color=color, label=label, marker=marker, markersize=3)
    else:
        ax.plot(x, y, color=color, label=label, marker=marker, markersize=3)


def _curves_figure(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame,
    smooth: float = 0.0,
    title: str | None = None,
    evaluated: str = "val",
) -> Figure:
    """The figure of `plot_curves`: axes[0] loss, axes[1] accuracy."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smoothing factor must be in [0, 1), got {smooth}")
    rows = _history_rows(history)
    epochs = _column(rows, "epoch")
    if np.isnan(epochs).any():
        epochs = np.arange(1, len(rows) + 1, dtype=np.float64)
    order = np.argsort(epochs, kind="stable")
    epochs = epochs[order]

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    loss_max = 0.0
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, color in (("train", TRAIN_COLOR), (evaluated, VAL_COLOR)):
            values = _column(rows, f"{split}_{metric}")[order]
            _plot_series(ax, epochs, values, color, split, smooth)
            if metric == "loss" and np.isfinite(values).any():
                loss_max = max(loss_max, float(values[np.isfinite(values)].max()))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title=f"EMA {smooth:g}" if smooth > 0 else None)
    # 0..1 when nothing was plotted (or every loss is 0): a valid, still-comparable frame.
    top = loss_max * 1.05 if loss_max > 0 else 1.0
    ax_loss.set_ylim(0.0, top)
    ax_acc.set_ylim(0.0, 1.0)
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame,
    path: str | os.PathLike,
    smooth: float = 0.0,
    title: str | None = None,
    evaluated: str = "val",
) -> Path:
    """Loss and accuracy per epoch, train vs the evaluated split, on fixed axes; writes a PNG.

    Args:
        history: rows with `epoch`, `train_loss`, `train_accuracy`, and optionally
            `<evaluated>_loss`, `<evaluated>_accuracy` (missing, None or NaN where there was no
            evaluation).
        path: where to write the PNG.
        smooth: EMA factor in [0, 1); above 0 the raw values are drawn faintly underneath.
        title: figure title.
        evaluated: the split evaluated each epoch (val, or test), as the legend names it.

    Returns:
        The path written.
    """
    return save_png(_curves_figure(history, smooth, title, evaluated), path)


def _confusion_figure(
    matrix: Any, classes: Sequence[str], normalize: bool = True, title: str | None = None
) -> Figure:
    """The figure of `plot_confusion`."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} for {n} classes")
    if normalize:
        support = counts.sum(axis=1, keepdims=True)
        # Rows of classes absent from the evaluated split stay 0 instead of 0/0.
        values = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(1.0, float(values.max())) if n else 1.0

    side = min(16.0, max(4.0, 0.45 * n + 2.5))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalize else "count")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion (row-normalised)" if normalize else "confusion (counts)"))
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
        ax.set_yticks(range(n), labels=list(classes))
    else:  # unreadable names; the image still shows where the mass is
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                value = values[i, j]
                text = f"{value:.2f}" if normalize else f"{value:g}"
                color = "white" if value > vmax / 2 else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    return fig


def plot_confusion(
    matrix: Any,
    classes: Sequence[str],
    path: str | os.PathLike,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Confusion matrix as a heatmap, rows true class, columns predicted; writes a PNG.

    Args:
        matrix: (C, C) counts, e.g. `classification_report(...)["confusion_matrix"]`.
        classes: class names, index order.
        path: where to write the PNG.
        normalize: show each row as fractions of its true class (empty rows stay 0).
        title: axes title; a default says counts or row-normalised.

    Returns:
        The path written.
    """
    return save_png(_confusion_figure(matrix, classes, normalize, title), path)


def _lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestion: float | None = None,
    smoothed: Sequence[float] | None = None,
) -> Figure:
    """The figure of `plot_lr_find`."""
    from matplotlib.figure import Figure

    lrs_arr = np.asarray(lrs, dtype=np.float64)
    raw = np.asarray(losses, dtype=np.float64)
    if raw.shape != lrs_arr.shape:
        raise ValueError(f"lr finder: {lrs_arr.size} learning rates but {raw.size} losses")
    smooth = None if smoothed is None else np.asarray(smoothed, dtype=np.float64)
    if smooth is not None and smooth.shape != lrs_arr.shape:
        raise ValueError(f"lr finder: {lrs_arr.size} learning rates but {smooth.size} smoothed")
    on_log_axis = np.isfinite(lrs_arr) & (lrs_arr > 0)

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    raw_keep = on_log_axis & np.isfinite(raw)
    ax.plot(
        lrs_arr[raw_keep],
        raw[raw_keep],
        color=TRAIN_COLOR,
        alpha=RAW_ALPHA if smooth is not None else 1.0,
        linewidth=1,
        label="loss",
    )
    low_values = high_values = raw[raw_keep]
    if smooth is not None:
        keep = on_log_axis & np.isfinite(smooth)
        ax.plot(lrs_arr[keep], smooth[keep], color=TRAIN_COLOR, label="smoothed loss")
        if keep.any():
            # The raw loss explodes at the end of the sweep: its top would flatten the rest.
            high_values = smooth[keep]
            low_values = np.concatenate([low_values, smooth[keep]])
    if high_values.size:
        low, high = float(low_values.min()), float(high_values.max())
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - pad, high + pad)
    if suggestion is not None and suggestion > 0:
        ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title("learning-rate finder")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    path: str | os.PathLike,
    suggestion: float | None = None,
    smoothed: Sequence[float] | None = None,
) -> Path:
    """Loss against learning rate on a log axis, with the suggested lr marked; writes a PNG.

    Args:
        lrs: learning rate of each step of the sweep.
        losses: raw loss at each step (drawn faintly when `smoothed` is given).
        path: where to write the PNG.
        suggestion: the lr to mark with a vertical line; its value goes in the legend.
        smoothed: smoothed loss at each step, e.g. `smooth_ema(losses, 0.98)`.

    Returns:
        The path written.
    """
    return save_png(_lr_find_figure(lrs, losses, suggestion, smoothed), path)
