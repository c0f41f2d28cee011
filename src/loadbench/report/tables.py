"""The report's tables: one per dataset (configurations x measures) and the headline
"formats x datasets" summary, as numbers (`pandas`) and as text cells ready to render."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loadbench.report.comparisons import comparisons, config_key
from loadbench.report.data import CONFIG, STAGES, Results, is_peer, peer_mark, warm_only
from loadbench.significance import (
    ALPHA,
    SPREAD_LIMIT,
    coefficient_of_variation,
    median_ci,
    smallest_p,
    spread,
)

# The bootstrap's seed: fixed, so that the same records give the same report.
SEED = 0


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


def trained_suffix(framework: str | None, graph: str | None) -> str:
    """How a configuration's name shows what trained it: nothing for torch eager (and for
    loader-only runs, which train nothing), /compiled for torch.compile, /keras-GRAPH."""
    framework = "torch" if _nan(framework) or not framework else framework
    graph = "eager" if _nan(graph) or not graph else graph
    if framework == "torch":
        return "" if graph == "eager" else f"/{graph}"
    return f"/{framework}-{graph}"


def config_name(row) -> str:
    """format/dtype/access/wN, with its order, world, framework and storage when not the
    default, and " (peer)" for another project's loader."""
    suffix = order_suffix(row.get("shuffle")) + world_suffix(row.get("world_size"))
    suffix += trained_suffix(row.get("framework"), row.get("graph"))
    suffix += storage_suffix(row.get("storage")) + peer_mark(row["format"])
    return f"{row['format']}/{row['dtype']}/{row['access']}/w{int(row['workers'])}{suffix}"


def aggregate(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Medians over the repeats of every configuration; for the epoch time also its IQR, its
    95% bootstrap interval, the coefficient of variation and the spread (`spread_flag`: a
    repeat more than 5% from the median, MLPerf Storage's rule)."""
    grouped = runs.groupby(by, sort=False, dropna=False)
    out = grouped.agg(
        repeats=("key", "count"),
        epoch_s=("epoch_s", "median"),
        epoch_q25=("epoch_s", lambda s: s.quantile(0.25)),
        epoch_q75=("epoch_s", lambda s: s.quantile(0.75)),
        first_epoch_s=("first_epoch_s", "median"),
        total_time_s=("total_time_s", "median"),
        images_per_s=("images_per_s", "median"),
        cpu_budget=("cpu_budget", "first"),
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
        stopped=("stopped", lambda s: next(iter(s.dropna()), None)),
        final_accuracy=("final_accuracy", "median"),
        compile_time_s=("compile_time_s", "median"),
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
    epochs = [tuple(float(v) for v in g.dropna()) for _, g in grouped["epoch_s"]]
    intervals = [interval(v) for v in epochs]
    out["epoch_ci_low"] = [low for _, low, _ in intervals]
    out["epoch_ci_high"] = [high for _, _, high in intervals]
    out["epoch_cv"] = [coefficient_of_variation(v) for v in epochs]
    out["epoch_spread"] = [spread(v) for v in epochs]
    out["spread_flag"] = out["epoch_spread"] > SPREAD_LIMIT
    return out


@functools.lru_cache(maxsize=8192)
def interval(values: tuple[float, ...]) -> tuple[float, float, float]:
    """(median, low, high) of `values` (repeats): `median_ci`, seeded; cached, as every table
    and plot asks for the same configurations'."""
    return median_ci(values, seed=SEED)


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
    table, caches = _dataset_numbers(results, dataset)
    shown = {
        "cold": len(caches) == 2,
        "gpu": table["gpu_util_pct_mean"].notna().any(),
        "block": (table["shuffle"] != "exact").any(),
        "remote": (table["storage"] != "local").any(),
        "ddp": (table["world_size"] > 1).any(),
        "adaptive": table["stopped"].notna().any(),
        "peer": any(is_peer(name) for name in table["format"]),
    }
    groups = [columns for key, columns in _column_groups(caches[0]) if key is None or shown[key]]
    headers = [h for columns in groups for h in columns.headers]
    rows = [[c for columns in groups for c in columns.cells(i, r)] for i, r in table.iterrows()]
    notes = _dataset_notes(shown) + _spread_notes(table) + _group_notes(results, table)
    return Table(dataset, headers, rows, notes + _timing_notes(table["timing"]), table)


def _dataset_numbers(results: Results, dataset: str) -> tuple[pd.DataFrame, list[str]]:
    """Per configuration: medians over repeats (warm, with cold beside it when both ran),
    fastest first, with its ratio to the fastest (and to local disk for remote rows) and its
    tie group."""
    runs = results.runs[results.runs["dataset"] == dataset]
    caches = [c for c in ("warm", "cold") if c in set(runs["cache"])]
    stats = aggregate(runs, [*CONFIG, "cache"])
    table = stats[stats["cache"] == caches[0]].drop(columns="cache").set_index(CONFIG)
    if len(caches) == 2:  # warm and cold side by side
        cold = stats[stats["cache"] == "cold"].set_index(CONFIG)
        for column in ("epoch_s", "epoch_ci_low", "epoch_ci_high", "first_epoch_s"):
            table[f"cold_{column}"] = cold[column]
    table = table.reset_index().sort_values("epoch_s", na_position="last").reset_index(drop=True)
    fastest = table["epoch_s"].min()
    table["ratio"] = table["epoch_s"] / fastest if fastest and fastest > 0 else np.nan
    if (table["storage"] != "local").any():
        table["vs_local"] = versus_local(table)
    timed = [config_key(r) for _, r in table.iterrows() if not _nan(r["epoch_s"])]
    letters = comparisons(results).letters(dataset, timed)
    table["group"] = [letters.get(config_key(r), "-") for _, r in table.iterrows()]
    return table, caches


def _column_groups(main_cache: str) -> list[tuple[str | None, _Columns]]:
    """(the condition that shows them, or None for always; the columns), in table order."""

    def lead(i, r):
        return [
            "★" if i == 0 and not _nan(r["epoch_s"]) else "", config_name(r),
            str(int(r["repeats"])),
            with_interval(r["epoch_s"], r["epoch_ci_low"], r["epoch_ci_high"]),
            _pct(r["epoch_cv"], 1) + (" ⚠" if r["spread_flag"] else ""),
            f"{r['ratio']:.2f}x" if not _nan(r["ratio"]) else "-", r["group"],
        ]  # fmt: skip

    def ranks(i, r):
        straggler, per_rank = r["straggler_ratio"], r["rank_images_per_s"]
        return [
            str(int(r["world_size"])), "-" if _nan(straggler) else f"{straggler:.2f}x",
            " / ".join(_count(v) for v in per_rank) if per_rank else "-",
        ]  # fmt: skip

    return [
        (None, _Columns(["", "configuration", "repeats",
                         f"epoch s ({main_cache}, median [95% CI])", "CV", "x fastest", "group"],
                        lead)),
        ("cold", _Columns(["epoch s (cold)"], lambda i, r: [with_interval(
            r["cold_epoch_s"], r["cold_epoch_ci_low"], r["cold_epoch_ci_high"])])),
        (None, _Columns(
            ["1st epoch s", "total s", "img/s", "cores", "img/s/core", "data stall", "AU",
             "peak RSS", "CPU %"],
            lambda i, r: [_num(r["first_epoch_s"]), _num(r["total_time_s"]),
                          _count(r["images_per_s"]), _count(r["cpu_budget"]),
                          _count(r["images_per_s"] / r["cpu_budget"]), _pct(r["stall_share"]),
                          _pct(r["au"]), _bytes(r["peak_rss_bytes"]), _count(r["cpu_pct_mean"])],
        )),
        ("gpu", _Columns(["GPU %", "GPU mem"], lambda i, r: [
            _count(r["gpu_util_pct_mean"]), _bytes(r["gpu_mem_bytes_max"])])),
        ("block", _Columns(["order jump", "same-class pairs"], lambda i, r: [
            _num(r["order_jump_ratio"], 3), _pct(r["order_same_class"])])),
        ("remote", _Columns(["vs local", "read-through hits"], lambda i, r: [
            f"{r['vs_local']:.2f}x" if not _nan(r["vs_local"]) else "-",
            _pct(r["read_through_hit_rate"])])),
        ("ddp", _Columns(["ranks", "straggler", "img/s per rank"], ranks)),
        ("adaptive", _Columns(["repeats stopped"], lambda i, r: [r["stopped"] or "-"])),
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
        "median over repeats with its 95% interval (percentile bootstrap over the repeats, "
        f"seed {SEED}: the same records give the same interval; with 2 repeats it is their "
        "range). CV: the repeats' standard deviation over their mean. The first epoch (cold "
        "start) is apart.",
        "★ marks the fastest median; 'x fastest' is each row's epoch time over it.",
        "cores: the run's CPU budget for loading (its DataLoader workers or a thread-based "
        "loader's threads; 1 for the main process alone; at most the cores the run could use); "
        "img/s/core is img/s over it.",
    ]
    if shown["peer"]:
        notes.append(
            "Rows marked (peer) are other projects' loaders, run as their own documentation "
            "recommends over the same source pixels, batch size and CPU budget (docs/peers.md); "
            "'own order': the peer draws its library's epoch order (its own shuffle, seeded per "
            "epoch), the others loadbench's exact one."
        )
    if not shown["gpu"]:
        notes.append("No GPU was used: GPU columns are left out.")
    if shown["adaptive"]:
        notes.append(
            "Repeats are adaptive: after the minimum, a configuration got another repeat while "
            "the 95% interval of its median epoch time was wider than the experiment's share of "
            "the median; 'repeats stopped' says why it got no more (repeats.json)."
        )
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


def _spread_notes(table: pd.DataFrame) -> list[str]:
    if not table["spread_flag"].any():
        return []
    return [
        f"⚠: a repeat lies more than {100 * SPREAD_LIMIT:.0f}% from the row's median. MLPerf "
        "Storage (submission guidelines §6.7, 'Replicability is mandatory'): 'Replicated "
        "results should be within 5% within 5 tries', a result being the mean of 5 runs. "
        "loadbench applies it to the repeats: each repeat, a replication, within 5% of the "
        "reported result (here the median). A flagged row is not a valid result by that rule: "
        "the next run of the experiment may well move its median."
    ]


def _group_notes(results: Results, table: pd.DataFrame) -> list[str]:
    """What the group letters mean, and when the repeats are too few for any letter to split."""
    family = comparisons(results)
    note = (
        "group: rows that share a letter are not told apart (two-sided Mann-Whitney test over "
        f"the repeats, {100 * ALPHA:.0f}% after Holm's correction over all {family.count} "
        "comparisons this report makes); the fastest row is in group a."
    )
    repeats = table["repeats"][table["epoch_s"].notna()]
    if len(repeats) >= 2:
        fewest = int(repeats.min())
        if smallest_p(fewest, fewest) >= ALPHA:
            need = fewest_repeats(max(family.count, 1))
            note += (
                f" With {fewest} repeats per row the exact test's smallest p-value is "
                f"{smallest_p(fewest, fewest):.2f}, so no two rows can be told apart, however "
                f"far apart their medians: that takes at least {need} repeats per row here."
            )
    return [note]


def fewest_repeats(family_size: int) -> int:
    """The fewest repeats per configuration with which an exact Mann-Whitney test can reject
    at all after Holm's correction over `family_size` tests (its strictest step)."""
    return next(n for n in range(2, 1000) if smallest_p(n, n) <= ALPHA / family_size)


def with_interval(median, low, high) -> str:
    """'0.203 [0.198-0.207]'; the median alone where there is no interval (one repeat)."""
    if _nan(median):
        return "-"
    if _nan(low) or _nan(high):
        return _num(median)
    return f"{_num(median)} [{_num(low)}-{_num(high)}]"


def summary_table(results: Results) -> Table:
    """The thesis's headline: median steady-state epoch time, formats x datasets.

    Formats are sorted fastest first by the geometric mean over datasets of their time over
    the dataset's fastest (shown beside each time); bold marks the statistically tied leaders
    of each dataset. Where a format ran in several configurations (dtype, access, workers), its
    fastest one is shown, named under the time.
    """
    datasets = results.datasets
    stats = aggregate(warm_only(results.runs), ["dataset", *CONFIG])
    formats = list(dict.fromkeys(stats["format"]))
    several = stats.groupby(["dataset", "format"]).size().max() > 1 if len(stats) else False
    numbers = pd.DataFrame(index=formats, columns=datasets, dtype=float)
    best: dict[tuple[str, str], pd.Series] = {}
    for fmt in formats:
        for ds in datasets:
            part = stats[(stats["dataset"] == ds) & (stats["format"] == fmt)]
            part = part.dropna(subset=["epoch_s"])
            if not part.empty:
                best[fmt, ds] = part.loc[part["epoch_s"].idxmin()]
                numbers.loc[fmt, ds] = best[fmt, ds]["epoch_s"]
    ratios = numbers / numbers.min(axis=0).where(lambda v: v > 0)
    geomean = np.exp(np.log(ratios).mean(axis=1, skipna=True)).sort_values(na_position="last")
    numbers, ratios = numbers.loc[geomean.index], ratios.loc[geomean.index]
    leaders = _tied_leaders(results, best)
    rows = []
    for fmt in numbers.index:
        cells = [fmt]
        for ds in datasets:
            if (fmt, ds) not in best:
                cells.append("-")
                continue
            text = f"{_num(numbers.loc[fmt, ds])} ({_ratio(ratios.loc[fmt, ds])})"
            if several:
                text += f" {config_name(best[fmt, ds]).partition('/')[2]}"
            cells.append(f"**{text}**" if (fmt, ds) in leaders else text)
        rows.append([*cells, _ratio(geomean[fmt])])
    return Table(
        "Median epoch time (s), formats x datasets",
        ["format", *datasets, "x fastest (geometric mean)"],
        rows,
        _summary_notes(results, best, leaders),
        numbers,
    )


def _tied_leaders(results: Results, best: dict[tuple[str, str], pd.Series]) -> set:
    """(format, dataset) of each dataset's fastest format and of every format whose fastest
    configuration the tests do not tell apart from it."""
    family = comparisons(results)
    leaders = set()
    for ds in results.datasets:
        shown = {fmt: row for (fmt, d), row in best.items() if d == ds}
        if not shown:
            continue
        top = config_key(min(shown.values(), key=lambda r: r["epoch_s"]))
        leaders |= {(fmt, ds) for fmt, row in shown.items()
                    if not family.differs("epoch", ds, config_key(row), top)}  # fmt: skip
    return leaders


def _summary_notes(results: Results, best: dict, leaders: set) -> list[str]:
    notes = [
        "Sorted by the last column: the geometric mean over the datasets it ran of the "
        "format's epoch time over the dataset's fastest (shown beside each time). Bold: the "
        "dataset's fastest format and every format statistically tied with it (its "
        "configuration shown is not told apart from the fastest: two-sided Mann-Whitney test "
        f"over repeats, 5% after Holm's correction over the report's "
        f"{comparisons(results).count} comparisons). Steady-state epochs, warm cache."
    ]
    if len({fmt for fmt, _ in best}) > 1 and leaders == set(best):
        repeats = int(aggregate(warm_only(results.runs), ["dataset", *CONFIG])["repeats"].min())
        notes.append(
            f"Every format is tied with the fastest: with {repeats} repeat"
            f"{'s' if repeats != 1 else ''} per configuration the tests tell none apart, so "
            "the order is the medians' and another run of the experiment may change it."
        )
    return notes


def _ratio(value) -> str:
    return "-" if _nan(value) else f"{value:.2f}x"


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


def _pct(value, digits: int = 0) -> str:
    return "-" if _nan(value) else f"{100 * value:.{digits}f}%"


def _bytes(value) -> str:
    if _nan(value):
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
