"""A few sentences computed from the data: what a reader should take away."""

from __future__ import annotations

import numpy as np
import pandas as pd

from loadbench.report.data import CONFIG, Results, warm_only
from loadbench.report.tables import aggregate, config_name


def findings(results: Results) -> list[str]:
    out: list[str] = []
    runs = results.runs
    for ds in results.datasets:
        part = runs[runs["dataset"] == ds]
        stats = aggregate(warm_only(part), CONFIG).dropna(subset=["epoch_s"])
        if len(stats) >= 2:
            fast = stats.loc[stats["epoch_s"].idxmin()]
            slow = stats.loc[stats["epoch_s"].idxmax()]
            out.append(
                f"On {ds}, {config_name(fast)} was {slow['epoch_s'] / fast['epoch_s']:.1f}x "
                f"faster than {config_name(slow)} ({fast['epoch_s']:.3f} s vs "
                f"{slow['epoch_s']:.3f} s per epoch)."
            )
        out += _storage(part, ds)
        stalled = stats[stats["stall_share"] > 0.3].sort_values("stall_share", ascending=False)
        if len(stalled):
            worst = stalled.iloc[0]
            out.append(
                f"On {ds}, {config_name(worst)} spent {100 * worst['stall_share']:.0f}% of its "
                "epochs waiting for data: the loader, not the model, set its pace."
            )
        out += _accuracy(stats, ds)
        out += _cold(part, ds)
    out += _dtypes(runs)
    out += _workers(runs)
    return out


def _storage(part: pd.DataFrame, ds: str) -> list[str]:
    sizes = part.groupby(["format", "dtype"])["bytes_per_image"].first().dropna()
    if len(sizes) < 2:
        return []
    reference = ("npy", "uint8") if ("npy", "uint8") in sizes.index else sizes.idxmax()
    smallest = sizes.idxmin()
    if smallest == reference:
        return []
    saving = 1 - sizes[smallest] / sizes[reference]
    largest = sizes.idxmax()
    text = (
        f"On {ds}, {'/'.join(smallest)} used {100 * saving:.0f}% less disk than "
        f"{'/'.join(reference)} ({sizes[smallest]:,.0f} vs {sizes[reference]:,.0f} bytes per image)"
    )
    if largest != reference:
        text += f"; {'/'.join(largest)} used the most ({sizes[largest]:,.0f})"
    return [text + "."]


def _accuracy(stats: pd.DataFrame, ds: str) -> list[str]:
    accuracy = stats.groupby("format")["final_accuracy"].median().dropna()
    if len(accuracy) < 2:
        return []
    low, high = accuracy.min(), accuracy.max()
    if high - low <= 0.05:
        return [
            f"On {ds}, final accuracy ranged {low:.3f}-{high:.3f} across formats: the format "
            "did not change what the model learnt."
        ]
    return [
        f"On {ds}, final accuracy differed by format ({accuracy.idxmin()} {low:.3f}, "
        f"{accuracy.idxmax()} {high:.3f}); with few repeats this is noise, or a lossy format "
        "(JPEG) changing the data: `loadbench verify` tells which."
    ]


def _cold(part: pd.DataFrame, ds: str) -> list[str]:
    if not {"warm", "cold"} <= set(part["cache"]):
        return []
    first = part.groupby(["format", "cache"])["first_epoch_s"].median().unstack()
    ratio = (first["cold"] / first["warm"]).dropna()
    if ratio.empty:
        return []
    worst = ratio.idxmax()
    return [
        f"On {ds}, a cold page cache made the first epoch {np.median(ratio):.2f}x as long "
        f"(median over formats; {worst} {ratio[worst]:.2f}x)."
    ]


def _dtypes(runs: pd.DataFrame) -> list[str]:
    if runs["dtype"].nunique() < 2 or "uint8" not in set(runs["dtype"]):
        return []
    stats = aggregate(warm_only(runs), ["dataset", "format", "access", "workers", "dtype"])
    table = stats.pivot_table(
        index=["dataset", "format", "access", "workers"], columns="dtype", values="epoch_s"
    )
    out = []
    for dtype in ("float16", "float32"):
        if dtype in table:
            ratio = (table[dtype] / table["uint8"]).dropna()
            if len(ratio):
                out.append(
                    f"Stored as {dtype}, epochs took {np.median(ratio):.2f}x the time of uint8 "
                    f"(median over {len(ratio)} format/dataset pairs)."
                )
    return out


def _workers(runs: pd.DataFrame) -> list[str]:
    if runs["workers"].nunique() < 2:
        return []
    stats = aggregate(warm_only(runs), ["dataset", "format", "dtype", "access", "workers"])
    out = []
    for (ds, fmt, dtype, access), part in stats.groupby(["dataset", "format", "dtype", "access"]):
        part = part.dropna(subset=["images_per_s"]).sort_values("workers")
        if len(part) >= 2 and part["images_per_s"].iloc[0] > 0:
            best = part.loc[part["images_per_s"].idxmax()]
            gain = best["images_per_s"] / part["images_per_s"].iloc[0]
            if gain > 1.2:
                out.append(
                    f"On {ds}, {fmt}/{dtype}/{access} was {gain:.1f}x faster with "
                    f"{int(best['workers'])} workers than with {int(part['workers'].iloc[0])}."
                )
    return out[:6]
