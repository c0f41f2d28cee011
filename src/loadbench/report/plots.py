"""The report's plots. Every format keeps one colour in every plot; a plot that has nothing to
show (one worker count, one dtype) is not drawn."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from loadbench.formats import ALL_NAMES
from loadbench.report.data import CONFIG, STAGES, Results, warm_only
from loadbench.report.tables import aggregate, config_name, interval, order_suffix
from loadbench.training.plots import save_png

_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
]  # fmt: skip
FORMAT_COLOURS = dict(zip(ALL_NAMES, _PALETTE, strict=False))


def colour(fmt: str) -> str:
    if fmt not in FORMAT_COLOURS:  # peers and future formats: the next free colour, stable
        FORMAT_COLOURS[fmt] = _PALETTE[len(FORMAT_COLOURS) % len(_PALETTE)]
    return FORMAT_COLOURS[fmt]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "dataset"


def _configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Configurations of one dataset (warm cache when there is one), fastest first."""
    stats = aggregate(warm_only(runs), CONFIG).sort_values("epoch_s", na_position="last")
    stats["name"] = [config_name(r) for _, r in stats.iterrows()]
    return stats


def plot_dataset(results: Results, dataset: str, out_dir: str) -> dict[str, str]:
    """Every per-dataset plot that has something to show: {kind: path}."""
    runs = results.runs[results.runs["dataset"] == dataset]
    if runs.empty:
        return {}
    stats = _configs(runs)
    base = os.path.join(out_dir, _slug(dataset))
    made = {
        "epoch time": _epoch_boxes(runs, stats, dataset, f"{base}-epoch-time.png"),
        "data stall": _stall_bars(stats, dataset, f"{base}-stall.png"),
        "memory": _memory_bars(stats, dataset, f"{base}-memory.png"),
    }
    stages = _stage_source(results, dataset)
    if stages is not None:
        made["loader stages"] = _stage_bars(stages, dataset, f"{base}-stages.png")
    if runs["workers"].nunique() > 1:
        made["workers"] = _workers_lines(runs, dataset, f"{base}-workers.png")
    if runs["dtype"].nunique() > 1:
        made["dtypes"] = _dtype_bars(runs, dataset, f"{base}-dtypes.png")
    epochs = results.epochs[results.epochs["dataset"] == dataset]
    if epochs["eval_loss"].notna().any():
        made["curves"] = _curves(epochs, dataset, f"{base}-curves.png")
    return {kind: str(path) for kind, path in made.items() if path}


def _errors(median, low, high) -> np.ndarray:
    """matplotlib's xerr/yerr of intervals: distances below and above each median (0 where
    there is no interval)."""
    median, low, high = (np.asarray(v, dtype=float) for v in (median, low, high))
    below, above = np.nan_to_num(median - low), np.nan_to_num(high - median)
    return np.clip(np.vstack([below, above]), 0, None)


CI_LABEL = "median, 95% bootstrap interval"


def _epoch_boxes(runs, stats, dataset, path):
    runs = warm_only(runs)
    fig = Figure(figsize=(max(6, 0.6 * len(stats) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    data, labels, colours = [], [], []
    for _, row in stats.iterrows():
        values = _values(runs, row, "epoch_s")
        data.append(values if len(values) else [np.nan])
        labels.append(row["name"])
        colours.append(colour(row["format"]))
    boxes = ax.boxplot(data, patch_artist=True, widths=0.6)
    for patch, c in zip(boxes["boxes"], colours, strict=True):
        patch.set_facecolor(c)
        patch.set_alpha(0.7)
    for i, values in enumerate(data, 1):  # every repeat, so a box of 2 is not mistaken for 10
        ax.plot(np.full(len(values), i), values, "k.", markersize=3)
    # The median's interval beside each box: what a comparison of two boxes can rely on.
    beside = np.arange(1, len(data) + 1) + 0.4
    ax.errorbar(beside, stats["epoch_s"], _errors(*_ci(stats)), fmt="D", color="black",
                markersize=3, capsize=2, linewidth=1, label=CI_LABEL)  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("steady-state epoch time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{dataset}: epoch time over repeats")
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def _ci(stats: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    return stats["epoch_s"], stats["epoch_ci_low"], stats["epoch_ci_high"]


def _values(runs: pd.DataFrame, row: pd.Series, column: str) -> tuple[float, ...]:
    """`column` over the repeats of the configuration `row` (of `aggregate(runs, CONFIG)`)."""
    mask = np.ones(len(runs), dtype=bool)
    for key in CONFIG:
        mask &= (runs[key] == row[key]).to_numpy()
    return tuple(float(v) for v in runs.loc[mask, column].dropna())


def _stall_bars(stats, dataset, path):
    fig = Figure(figsize=(7, 0.35 * len(stats) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(stats))
    wait = stats["data_wait_s"].fillna(0).to_numpy()
    compute = stats["compute_s"].fillna(0).to_numpy()
    colours = [colour(f) for f in stats["format"]]
    ax.barh(y, wait, color=colours)
    ax.barh(y, compute, left=wait, color="#cccccc")
    ax.errorbar(stats["epoch_s"], y, xerr=_errors(*_ci(stats)), fmt="D", color="black",
                markersize=3, capsize=2, linewidth=1)  # fmt: skip
    ax.set_yticks(y, stats["name"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per epoch (median)")
    ax.set_title(f"{dataset}: data stall vs compute")
    handles = [
        Patch(facecolor="#555555", label="waiting for data (in the format's colour)"),
        Patch(facecolor="#cccccc", label="compute"),
        Line2D([], [], color="black", marker="D", markersize=3, label=f"epoch time: {CI_LABEL}"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8)
    return save_png(fig, path)


STAGE_COLOURS = {"read_s": "#4c72b0", "decode_s": "#dd8452", "collate_s": "#55a868",
                 "augment_s": "#c44e52", "h2d_s": "#8172b3"}  # fmt: skip


def _stage_source(results: Results, dataset: str) -> pd.DataFrame | None:
    """Per configuration, the median seconds per epoch of each loader stage: from the
    loader-only runs when there are (no model competes for the cores), else from the main
    runs; None when no run of the dataset counted its stages."""
    for runs in (results.ceilings[results.ceilings["mode"] == "loader-only"], results.runs):
        runs = warm_only(runs[runs["dataset"] == dataset]) if len(runs) else runs
        if len(runs) and runs[[f"stage_{k}" for k in STAGES]].notna().any().any():
            stats = _configs(runs).dropna(subset=[f"stage_{k}" for k in STAGES], how="all")
            stats["source"] = runs["mode"].iloc[0]
            return stats
    return None


def _stage_bars(stats, dataset, path):
    fig = Figure(figsize=(7.5, 0.35 * len(stats) + 2.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(stats))
    left = np.zeros(len(stats))
    for stage in STAGES:
        values = stats[f"stage_{stage}"].fillna(0).to_numpy(dtype=float)
        if values.any():  # a stage no row has (no augmentation, no copy timed) is left out
            ax.barh(y, values, left=left, color=STAGE_COLOURS[stage],
                    label=stage.removesuffix("_s"))  # fmt: skip
        left += values
    # Without workers the loader works in the main process, inside the data wait: what the
    # stages leave of it is torch's DataLoader loop and the sampler, counted by no stage.
    wait = stats["data_wait_s"].to_numpy(dtype=float)
    other = np.where(stats["workers"].to_numpy() == 0, np.clip(wait - left, 0, None), 0)
    if np.nan_to_num(other).any():
        ax.barh(y, np.nan_to_num(other), left=left, color="#cccccc",
                label="other (DataLoader loop, sampler; no workers)")  # fmt: skip
    ax.set_yticks(y, stats["name"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per epoch, summed over worker processes (median)")
    ax.set_title(f"{dataset}: where the loader's time goes ({stats['source'].iloc[0]} runs)")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    return save_png(fig, path)


def _memory_bars(stats, dataset, path):
    gpu = stats["gpu_mem_bytes_max"].notna().any()
    fig = Figure(figsize=(7 * (2 if gpu else 1), 0.35 * len(stats) + 1.6), layout="constrained")
    axes = fig.subplots(1, 2 if gpu else 1, squeeze=False)[0]
    y = np.arange(len(stats))
    colours = [colour(f) for f in stats["format"]]
    panels = [("peak_rss_bytes", "peak RSS of the process tree (MiB)")]
    if gpu:
        panels.append(("gpu_mem_bytes_max", "peak GPU memory used (MiB)"))
    for ax, (column, label) in zip(axes, panels, strict=True):
        ax.barh(y, stats[column].fillna(0).to_numpy() / 2**20, color=colours)
        ax.set_yticks(y, stats["name"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    fig.suptitle(f"{dataset}: memory")
    return save_png(fig, path)


def _workers_lines(runs, dataset, path):
    runs = warm_only(runs)
    stats = aggregate(runs, CONFIG)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    lines = stats.groupby(["format", "dtype", "access", "shuffle"])
    for (fmt, dtype, access, order), part in lines:
        part = part.sort_values("workers")
        rates = [interval(_values(runs, row, "images_per_s")) for _, row in part.iterrows()]
        ax.errorbar(part["workers"], part["images_per_s"], _errors(*zip(*rates, strict=True)),
                    fmt="o-", color=colour(fmt), capsize=2,
                    label=f"{fmt}/{dtype}/{access}{order_suffix(order)}")  # fmt: skip
    ax.set_xlabel("DataLoader workers")
    ax.set_ylabel("images/s (steady state)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{dataset}: throughput vs workers (bars: {CI_LABEL})")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def _dtype_bars(runs, dataset, path):
    stats = aggregate(warm_only(runs), ["format", "dtype"])
    dtypes = [d for d in ("uint8", "float16", "float32") if d in set(stats["dtype"])]
    formats = list(dict.fromkeys(stats["format"]))
    fig = Figure(figsize=(max(6, 0.8 * len(formats) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(dtypes)
    hatches = {"uint8": "", "float16": "//", "float32": "xx"}
    for i, dtype in enumerate(dtypes):
        part = stats[stats["dtype"] == dtype].set_index("format")
        values = [part["epoch_s"].get(f, np.nan) for f in formats]
        errors = _errors(values, *([part[c].get(f, np.nan) for f in formats]
                                   for c in ("epoch_ci_low", "epoch_ci_high")))  # fmt: skip
        positions = np.arange(len(formats)) + i * width
        ax.bar(positions, values, width, label=dtype, color=[colour(f) for f in formats],
               hatch=hatches[dtype], edgecolor="black", yerr=errors, capsize=2)  # fmt: skip
    ax.set_xticks(np.arange(len(formats)) + width * (len(dtypes) - 1) / 2, formats, rotation=30,
                  ha="right")  # fmt: skip
    ax.set_ylabel("steady-state epoch time (s)")
    ax.set_title(f"{dataset}: uint8 vs float16 vs float32 (bars: {CI_LABEL})", fontsize=10)
    ax.legend()
    return save_png(fig, path)


def _curves(epochs, dataset, path):
    """Loss and accuracy per epoch, mean over repeats, one line per format: the format must not
    change what is learnt."""
    mean = warm_only(epochs).groupby(["format", "epoch"]).mean(numeric_only=True).reset_index()
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for fmt, part in mean.groupby("format", sort=False):
        c = colour(fmt)
        loss_ax.plot(part["epoch"], part["train_loss"], "--", color=c, alpha=0.6)
        loss_ax.plot(part["epoch"], part["eval_loss"], "-", color=c, label=fmt)
        acc_ax.plot(part["epoch"], part["train_accuracy"], "--", color=c, alpha=0.6)
        acc_ax.plot(part["epoch"], part["eval_accuracy"], "-", color=c, label=fmt)
    top = np.nanmax(mean[["train_loss", "eval_loss"]].to_numpy()) if len(mean) else 1.0
    loss_ax.set_ylim(0, (top if np.isfinite(top) else 1.0) * 1.05)
    acc_ax.set_ylim(0, 1)
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    evaluated = "/".join(sorted(set(epochs["evaluated"].dropna()))) or "held-out"
    acc_ax.legend(fontsize=7, title=f"solid: {evaluated}, dashed: train", title_fontsize=7)
    fig.suptitle(f"{dataset}: training curves per format (mean over repeats)")
    return save_png(fig, path)


def plot_storage(results: Results, out_dir: str) -> str | None:
    """Bytes on disk per image, per format (and dtype), one panel per dataset."""
    runs = results.runs.dropna(subset=["bytes_per_image"])
    if runs.empty:
        return None
    datasets = list(dict.fromkeys(runs["dataset"]))
    fig = Figure(figsize=(5 * len(datasets), 4), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets, strict=True):
        part = runs[runs["dataset"] == ds].groupby(["format", "dtype"], sort=False)
        sizes = part["bytes_per_image"].first().sort_values()
        labels = [f"{f}/{d}" for f, d in sizes.index]
        ax.barh(range(len(sizes)), sizes.to_numpy() / 1024,
                color=[colour(f) for f, _ in sizes.index])  # fmt: skip
        ax.set_yticks(range(len(sizes)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("KiB per image on disk")
        ax.set_title(ds)
    fig.suptitle("storage size")
    return str(save_png(fig, os.path.join(out_dir, "storage.png")))
