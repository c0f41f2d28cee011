"""The framework section: the same model trained by torch and by Keras (TensorFlow), eager and
compiled (torch.compile; Keras' tf.function graph, or XLA), from the same loaders.

A row is a loader (every configuration key but framework and graph) trained one way. Each row
is set beside the same loader trained by torch eager, and the findings compare, within one
loader, the frameworks at one graph mode and the graph modes of one framework, with the
report's tests (`comparisons.py`) and the wording of every other finding (`findings.versus`).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from loadbench.report.comparisons import Comparisons, comparisons, config_key
from loadbench.report.data import CONFIG, Results, warm_only
from loadbench.report.findings import ratio_text, versus
from loadbench.report.plots import CI_LABEL, _errors, _slug
from loadbench.report.tables import (
    Table,
    _bytes,
    _num,
    _pct,
    aggregate,
    config_name,
    with_interval,
)
from loadbench.training.plots import save_png

HOW = ["framework", "graph"]
LOADER = [c for c in CONFIG if c not in HOW]  # what a framework comparison holds fixed
BASELINE = ("torch", "eager")
GRAPH_ORDER = {"eager": 0, "compiled": 1, "xla": 2}
# Findings beyond this many would bury the rest of the report; the table has every pair.
MOST_SENTENCES = 12


def has_frameworks(results: Results) -> bool:
    """Whether the runs were trained more than one way (framework or graph mode)."""
    runs = results.runs
    return len(runs) > 0 and len(runs[HOW].drop_duplicates()) > 1


def _stats(results: Results) -> pd.DataFrame:
    stats = aggregate(warm_only(results.runs), ["dataset", *CONFIG]).dropna(subset=["epoch_s"])
    untrained = {"framework": "", "graph": ""}  # the loader's name alone
    stats["loader"] = [config_name({**r, **untrained}) for _, r in stats.iterrows()]
    stats["order"] = [(r["framework"] != "torch", GRAPH_ORDER.get(r["graph"], 9))
                      for _, r in stats.iterrows()]  # fmt: skip
    return stats.sort_values(["dataset", "loader", "order"]).reset_index(drop=True)


def framework_table(results: Results) -> Table:
    """Every loader of every dataset, trained each way it was: epoch time with its interval,
    the ratio to the same loader under torch eager (* where the test tells them apart)."""
    family = comparisons(results)
    stats = _stats(results)
    rows = []
    for _, r in stats.iterrows():
        rows.append([
            r["dataset"], r["loader"], r["framework"], r["graph"],
            with_interval(r["epoch_s"], r["epoch_ci_low"], r["epoch_ci_high"]),
            _versus_baseline(family, stats, r), _num(r["images_per_s"]),
            _pct(r["stall_share"]), _num(r["compile_time_s"]), _pct(r["final_accuracy"], 1),
            _bytes(r["peak_rss_bytes"]),
        ])  # fmt: skip
    return Table(
        "Frameworks and graph modes",
        ["dataset", "loader", "framework", "graph", "epoch s [95% CI]", "vs torch eager",
         "img/s", "data wait", "compile s", "accuracy", "peak RSS"],
        rows,
        ["The same model (its parameter counts match), optimizer, batch size, epochs and "
         "normalisation in both frameworks. eager: torch op by op, Keras with run_eagerly; "
         "compiled: torch.compile, Keras' default tf.function graph; xla: Keras' jit_compile. "
         "Compile time (the first step's tracing and compiling) is not in the epoch time. "
         "'vs torch eager': the ratio of median epoch times with its 95% bootstrap interval, "
         "* where the report's test tells the two apart (Holm-corrected, 5%). Keras trains "
         "from the tf-data peer's own pipeline, or from loadbench's loader through a tf.data "
         "generator: the loader column says which."],
        numbers=stats,
    )  # fmt: skip


def _versus_baseline(family: Comparisons, stats: pd.DataFrame, row: pd.Series) -> str:
    if (row["framework"], row["graph"]) == BASELINE:
        return "1 (baseline)"
    same = stats[(stats["dataset"] == row["dataset"]) & (stats["loader"] == row["loader"])
                 & (stats["framework"] == BASELINE[0])
                 & (stats["graph"] == BASELINE[1])]  # fmt: skip
    if same.empty:
        return "-"
    base = same.iloc[0]
    ds = row["dataset"]
    x = family.values("epoch", ds, config_key(row))
    y = family.values("epoch", ds, config_key(base))
    mark = "*" if family.differs("epoch", ds, config_key(row), config_key(base)) else ""
    return ratio_text(x, y) + mark


def framework_findings(results: Results) -> list[str]:
    """Within each loader: the frameworks at each graph mode, and each framework's graph modes
    against eager, in the words (and with the tests) of every other finding; none where the
    runs were trained one way only."""
    if not has_frameworks(results):
        return []
    family = comparisons(results)
    stats = _stats(results)
    out = []
    for (ds, _loader), part in stats.groupby(["dataset", "loader"], sort=False):
        for a, b, which in _pairs(part):
            fast, slow = (a, b) if a["epoch_s"] <= b["epoch_s"] else (b, a)
            out.append(versus(family, ds, fast, slow, which))
    if len(out) > MOST_SENTENCES:
        left = len(out) - MOST_SENTENCES
        out = out[:MOST_SENTENCES] + [f"{left} more framework comparisons are in the table."]
    return out


def _pairs(part: pd.DataFrame):
    """(row, row, what they differ in) for the pairs of one loader the findings compare."""
    by_how = {(r["framework"], r["graph"]): r for _, r in part.iterrows()}
    for (framework, graph), row in by_how.items():
        if framework != "torch" and ("torch", graph) in by_how:
            yield by_how[("torch", graph)], row, f"torch against {framework}, both {graph}"
        if graph != "eager" and (framework, "eager") in by_how:
            yield by_how[(framework, "eager")], row, f"{framework}: {graph} against eager"


def plot_frameworks(results: Results, out_dir: str) -> dict[str, str]:
    """Per dataset, each loader's epoch time for each way it was trained: {caption: path}."""
    stats = _stats(results)
    made = {}
    for ds, part in stats.groupby("dataset", sort=False):
        path = os.path.join(out_dir, f"{_slug(ds)}-frameworks.png")
        made[f"{ds}: epoch time by framework and graph mode"] = str(_bars(part, ds, path))
    return made


def _bars(part: pd.DataFrame, dataset: str, path: str):
    loaders = list(dict.fromkeys(part["loader"]))
    ways = sorted({(r["framework"], r["graph"]) for _, r in part.iterrows()},
                  key=lambda w: (w[0] != "torch", GRAPH_ORDER.get(w[1], 9)))  # fmt: skip
    width = 0.8 / len(ways)
    fig = Figure(figsize=(max(6, 1.4 * len(loaders) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    for k, (framework, graph) in enumerate(ways):
        rows = [part[(part["loader"] == name) & (part["framework"] == framework)
                     & (part["graph"] == graph)] for name in loaders]  # fmt: skip
        pick = [r.iloc[0] if len(r) else None for r in rows]
        median = [np.nan if r is None else r["epoch_s"] for r in pick]
        low = [np.nan if r is None else r["epoch_ci_low"] for r in pick]
        high = [np.nan if r is None else r["epoch_ci_high"] for r in pick]
        x = np.arange(len(loaders)) + (k - (len(ways) - 1) / 2) * width
        ax.bar(x, median, width, label=f"{framework} {graph}", alpha=0.85)
        ax.errorbar(x, median, _errors(median, low, high), fmt="none", color="black",
                    capsize=2, linewidth=1)  # fmt: skip
    ax.set_xticks(range(len(loaders)), loaders, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("steady-state epoch time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{dataset}: framework x graph mode ({CI_LABEL})")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)
