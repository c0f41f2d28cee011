"""The report's tables: one per dataset (configurations x measures) and the headline
"formats x datasets" summary, as numbers (`pandas`) and as text cells ready to render."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loadbench.report.data import CONFIG, STAGES, Results, warm_only


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    numbers: pd.DataFrame | None = None  # the values behind the cells


def order_suffix(order: str | None) -> str:
    """How a configuration's name shows its epoch order: nothing for the default exact one."""
    return "" if order in ("exact", None) else f"/{order}-shuffle"


def storage_suffix(storage: str | None) -> str:
    """How a configuration's name shows where its store is: nothing for local disk."""
    return "" if storage in ("local", None) else f" @{storage}"


def world_suffix(world_size) -> str:
    """How a configuration's name shows a distributed run: /ddpN for N ranks, else nothing."""
    if world_size is None or _nan(world_size) or world_size <= 1:
        return ""
    return f"/ddp{int(world_size)}"


def config_name(row) -> str:
    suffix = order_suffix(row.get("shuffle")) + world_suffix(row.get("world_size"))
    suffix += storage_suffix(row.get("storage"))
    return f"{row['format']}/{row['dtype']}/{row['access']}/w{int(row['workers'])}{suffix}"


def aggregate(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Medians (and the epoch-time IQR) over the repeats of every configuration."""
    grouped = runs.groupby(by, sort=False, dropna=False)
    out = grouped.agg(
        repeats=("key", "count"),
        epoch_s=("epoch_s", "median"),
        epoch_q25=("epoch_s", lambda s: s.quantile(0.25)),
        epoch_q75=("epoch_s", lambda s: s.quantile(0.75)),
        first_epoch_s=("first_epoch_s", "median"),
        total_time_s=("total_time_s", "median"),
        images_per_s=("images_per_s", "median"),
        stall_share=("stall_share", "median"),
        data_wait_s=("data_wait_s", "median"),
        compute_s=("compute_s", "median"),
        peak_rss_bytes=("peak_rss_bytes", "median"),
        cpu_pct_mean=("cpu_pct_mean", "median"),
        gpu_util_pct_mean=("gpu_util_pct_mean", "median"),
        gpu_mem_bytes_max=("gpu_mem_bytes_max", "max"),
        cuda_max_allocated_bytes=("cuda_max_allocated_bytes", "max"),
        store_bytes=("store_bytes", "first"),
        bytes_per_image=("bytes_per_image", "first"),
        convert_time_s=("convert_time_s", "first"),
        final_accuracy=("final_accuracy", "median"),
        order_jump_ratio=("order_jump_ratio", "median"),
        order_same_class=("order_same_class", "median"),
        read_through_hit_rate=("read_through_hit_rate", "median"),
        straggler_ratio=("straggler_ratio", "median"),
        au=("au", "median"),
        timing=("timing", lambda s: ", ".join(sorted(set(s.dropna()))) or None),
        **{f"stage_{k}": (f"stage_{k}", "median") for k in (*STAGES, "bytes_read")},
    )
    out = out.reset_index()
    # Each rank's img/s, the median over repeats (groups come in the order agg gave them).
    out["rank_images_per_s"] = [_per_rank_median(g) for _, g in grouped["rank_images_per_s"]]
    return out


def versus_local(table: pd.DataFrame) -> pd.Series:
    """Each row's epoch time over the same configuration's on local disk: the network's cost
    (NaN for local rows and where no local twin was run)."""
    same = [c for c in CONFIG if c != "storage"]
    local = table[table["storage"] == "local"].set_index(same)["epoch_s"]
    twins = table.set_index(same).index.map(lambda k: local.get(k, np.nan))
    ratio = table["epoch_s"].to_numpy() / np.asarray(twins, dtype=float)
    return pd.Series(np.where(table["storage"] == "local", np.nan, ratio), index=table.index)


@dataclass(frozen=True)
class _Columns:
    """Columns a dataset table shows together, and each row's cells of them."""

    headers: list[str]
    cells: Callable[[int, pd.Series], list[str]]


def dataset_table(results: Results, dataset: str) -> Table:
    """One row per configuration of `dataset`, fastest first; optional columns (cold cache,
    GPU, block shuffle, object storage, DDP) only when some row has them."""
    table, caches = _dataset_numbers(results.runs[results.runs["dataset"] == dataset])
    shown = {
        "cold": len(caches) == 2,
        "gpu": table["gpu_util_pct_mean"].notna().any(),
        "block": (table["shuffle"] != "exact").any(),
        "remote": (table["storage"] != "local").any(),
        "ddp": (table["world_size"] > 1).any(),
    }
    groups = [columns for key, columns in _column_groups(caches[0]) if key is None or shown[key]]
    headers = [h for columns in groups for h in columns.headers]
    rows = [[c for columns in groups for c in columns.cells(i, r)] for i, r in table.iterrows()]
    notes = _dataset_notes(shown) + _timing_notes(table["timing"])
    return Table(dataset, headers, rows, notes, table)


def _dataset_numbers(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per configuration: medians over repeats (warm, with cold beside it when both ran),
    fastest first, with its ratio to the fastest (and to local disk for remote rows)."""
    caches = [c for c in ("warm", "cold") if c in set(runs["cache"])]
    stats = aggregate(runs, [*CONFIG, "cache"])
    table = stats[stats["cache"] == caches[0]].drop(columns="cache").set_index(CONFIG)
    if len(caches) == 2:  # warm and cold side by side
        cold = stats[stats["cache"] == "cold"].set_index(CONFIG)
        table["cold_epoch_s"] = cold["epoch_s"]
        table["cold_first_epoch_s"] = cold["first_epoch_s"]
    table = table.reset_index().sort_values("epoch_s", na_position="last").reset_index(drop=True)
    fastest = table["epoch_s"].min()
    table["ratio"] = table["epoch_s"] / fastest if fastest and fastest > 0 else np.nan
    if (table["storage"] != "local").any():
        table["vs_local"] = versus_local(table)
    return table, caches


def _column_groups(main_cache: str) -> list[tuple[str | None, _Columns]]:
    """(the condition that shows them, or None for always; the columns), in table order."""

    def lead(i, r):
        return [
            "★" if i == 0 and not _nan(r["epoch_s"]) else "", config_name(r),
            str(int(r["repeats"])),
            f"{_num(r['epoch_s'])} [{_num(r['epoch_q25'])}-{_num(r['epoch_q75'])}]",
            f"{r['ratio']:.2f}x" if not _nan(r["ratio"]) else "-",
        ]  # fmt: skip

    def ranks(i, r):
        straggler, per_rank = r["straggler_ratio"], r["rank_images_per_s"]
        return [
            str(int(r["world_size"])), "-" if _nan(straggler) else f"{straggler:.2f}x",
            " / ".join(_count(v) for v in per_rank) if per_rank else "-",
        ]  # fmt: skip

    return [
        (None, _Columns(["", "configuration", "repeats",
                         f"epoch s ({main_cache}, median [IQR])", "x fastest"], lead)),
        ("cold", _Columns(["epoch s (cold)"], lambda i, r: [_num(r["cold_epoch_s"])])),
        (None, _Columns(
            ["1st epoch s", "total s", "img/s", "data stall", "AU", "peak RSS", "CPU %"],
            lambda i, r: [_num(r["first_epoch_s"]), _num(r["total_time_s"]),
                          _count(r["images_per_s"]), _pct(r["stall_share"]), _pct(r["au"]),
                          _bytes(r["peak_rss_bytes"]), _count(r["cpu_pct_mean"])],
        )),
        ("gpu", _Columns(["GPU %", "GPU mem"], lambda i, r: [
            _count(r["gpu_util_pct_mean"]), _bytes(r["gpu_mem_bytes_max"])])),
        ("block", _Columns(["order jump", "same-class pairs"], lambda i, r: [
            _num(r["order_jump_ratio"], 3), _pct(r["order_same_class"])])),
        ("remote", _Columns(["vs local", "read-through hits"], lambda i, r: [
            f"{r['vs_local']:.2f}x" if not _nan(r["vs_local"]) else "-",
            _pct(r["read_through_hit_rate"])])),
        ("ddp", _Columns(["ranks", "straggler", "img/s per rank"], ranks)),
        (None, _Columns(["store", "bytes/img", "convert s", "accuracy"], lambda i, r: [
            _bytes(r["store_bytes"]), _count(r["bytes_per_image"]), _num(r["convert_time_s"]),
            _num(r["final_accuracy"], 3)])),
    ]  # fmt: skip


TIMING_NOTES = {
    "overlap": "timing overlap: nothing inside an epoch waits for the device, so on a GPU the "
    "next batch loads while the step computes, as in real training (on the CPU, loading overlaps "
    "computing only in DataLoader workers); data stall is host time blocked on the next batch, "
    "compute is device time from CUDA events (the step's host time on the CPU)",
    "sync": "timing sync: the device is synchronised after every step, so load and compute are "
    "measured apart and do not overlap (the serial breakdown)",
}


def _timing_notes(timings: pd.Series) -> list[str]:
    """How the rows' epochs were timed, said once per method used; AU is defined with them."""
    used = sorted({t for value in timings.dropna() for t in value.split(", ")})
    if not used:
        return []
    return [
        "; ".join(("some rows: " if len(used) > 1 else "") + TIMING_NOTES[t] for t in used)
        + ". AU (accelerator utilisation) is compute time over epoch time."
    ]  # fmt: skip


def _dataset_notes(shown: dict[str, bool]) -> list[str]:
    notes = [
        "Epoch times are the steady state: the median of every epoch after the first, then the "
        "median (and interquartile range) over repeats. The first epoch (cold start) is apart.",
        "★ marks the fastest configuration; 'x fastest' is each row's epoch time over it.",
    ]
    if not shown["gpu"]:
        notes.append("No GPU was used: GPU columns are left out.")
    if shown["ddp"]:
        notes.append(
            "Rows named /ddpN ran under torchrun with N ranks (DDP). Their img/s is the whole "
            "world's (every rank's images over the slowest rank's epoch time); 'straggler' is "
            "the slowest rank's epoch time over the median rank's (median over epochs and "
            "repeats; 1.00x: no straggler); 'img/s per rank' is each rank's own rate, rank 0 "
            "first. Memory and CPU columns are rank 0's."
        )
    if shown["remote"]:
        notes.append(
            "Rows named @storage read their store from object storage. 'vs local' is the epoch "
            "time over the same configuration's on local disk (the network's cost); "
            "'read-through hits' is the share of files served from the local read-through copy "
            "over the whole run (the first epoch fills it)."
        )
    if shown["block"]:
        notes.append(
            "block-shuffle rows read chunk by chunk in a less random order. 'order jump' is the "
            "mean distance between consecutive images over its value for an exact shuffle "
            "(1 = as random); 'same-class pairs' is the share of consecutive images of one class."
        )
    return notes


def bounds_table(results: Results, dataset: str) -> Table | None:
    """Each training configuration's epoch time beside its ceilings, DS-Analyzer style: the
    loader alone (its loader-only twin) and the model alone (the dataset's compute-only run).
    With perfect overlap an epoch takes max(loader, compute); the larger one names the bound.
    None when the dataset has no ceiling runs."""
    ceilings = warm_only(results.ceilings[results.ceilings["dataset"] == dataset])
    compute = ceilings.loc[ceilings["mode"] == "compute-only", "epoch_s"].dropna()
    loaders = aggregate(ceilings[ceilings["mode"] == "loader-only"], CONFIG)
    if compute.empty or loaders.empty:
        return None
    compute_s = float(compute.median())
    loader_s = loaders.set_index(CONFIG)["epoch_s"]
    table = aggregate(warm_only(results.runs[results.runs["dataset"] == dataset]), CONFIG)
    table = table.sort_values("epoch_s", na_position="last")
    rows = []
    for _, r in table.iterrows():
        loader = loader_s.get(tuple(r[c] for c in CONFIG), np.nan)
        if _nan(loader) or _nan(r["epoch_s"]):
            continue
        bound = max(loader, compute_s)
        rows.append([config_name(r), _num(r["epoch_s"]), _num(loader), _num(compute_s),
                     _num(bound), f"{r['epoch_s'] / bound:.2f}x", _pct(r["au"]),
                     bound_name(loader, compute_s)])  # fmt: skip
    if not rows:
        return None
    timing = ", ".join(sorted(set(table["timing"].dropna()))) or "-"
    return Table(
        f"{dataset}: what bounds each epoch",
        ["configuration", "epoch s", "loader s", "compute s", "max", "epoch / max", "AU",
         "bound"],
        rows,
        [f"loader s: the same configuration with no model (loader-only); compute s: the model "
         f"on one batch that stays on the device (compute-only), the epoch if data were free. "
         f"With perfect overlap an epoch takes max(loader, compute); 'epoch / max' above 1 is "
         f"overlap lost (without workers on the CPU, loader and model take turns) or time "
         f"neither explains. AU is compute time over epoch time (MLPerf's accelerator "
         f"utilisation). Medians over repeats, steady-state epochs; timing: {timing}."],
    )  # fmt: skip


def bound_name(loader_s: float, compute_s: float) -> str:
    """'data-bound: loader 2.1x slower than the model', or the compute-bound sentence."""
    if _nan(loader_s) or _nan(compute_s) or min(loader_s, compute_s) <= 0:
        return "-"
    if loader_s > compute_s:
        return f"data-bound: loader {loader_s / compute_s:.1f}x slower than the model"
    return f"compute-bound: model {compute_s / loader_s:.1f}x slower than the loader"


def summary_table(results: Results) -> Table:
    """The thesis's headline: median steady-state epoch time, formats x datasets.

    Where a format ran in several configurations (dtype, access, workers), its fastest one is
    shown, named under the time.
    """
    datasets = results.datasets
    stats = aggregate(warm_only(results.runs), ["dataset", *CONFIG])
    formats = list(dict.fromkeys(stats["format"]))
    several = stats.groupby(["dataset", "format"]).size().max() > 1 if len(stats) else False
    numbers = pd.DataFrame(index=formats, columns=datasets, dtype=float)
    rows = []
    for fmt in formats:
        cells = [fmt]
        for ds in datasets:
            part = stats[(stats["dataset"] == ds) & (stats["format"] == fmt)]
            part = part.dropna(subset=["epoch_s"])
            if part.empty:
                cells.append("-")
                continue
            best = part.loc[part["epoch_s"].idxmin()]
            numbers.loc[fmt, ds] = best["epoch_s"]
            text = _num(best["epoch_s"])
            if several:
                text += f" ({config_name(best).partition('/')[2]})"
            cells.append(text)
        rows.append(cells)
    order = numbers.mean(axis=1, skipna=True).sort_values().index if len(numbers) else []
    rows = sorted(rows, key=lambda row: list(order).index(row[0]))
    for ds in datasets:  # mark the fastest format of every dataset
        if numbers[ds].notna().any():
            best = numbers[ds].idxmin()
            column = datasets.index(ds) + 1
            for row in rows:
                if row[0] == best:
                    row[column] = f"**{row[column]}**"
    return Table(
        "Median epoch time (s), formats x datasets",
        ["format", *datasets],
        rows,
        ["Bold: the fastest format of the dataset. Steady-state epochs, warm cache."],
        numbers,
    )


def _per_rank_median(values: pd.Series) -> tuple[float, ...] | None:
    runs = [v for v in values if isinstance(v, tuple) and v]
    if not runs:
        return None
    ranks = min(len(v) for v in runs)
    return tuple(float(np.median([v[k] for v in runs])) for k in range(ranks))


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value)


def _num(value, digits: int | None = None) -> str:
    if _nan(value):
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    value = float(value)
    return (
        f"{value:.3f}"
        if abs(value) < 10
        else f"{value:.1f}"
        if abs(value) < 1000
        else f"{value:,.0f}"
    )


def _count(value) -> str:
    return "-" if _nan(value) else f"{value:,.0f}"


def _pct(value) -> str:
    return "-" if _nan(value) else f"{100 * value:.0f}%"


def _bytes(value) -> str:
    if _nan(value):
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
