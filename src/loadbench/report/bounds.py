"""What bounds each training configuration: its epoch time beside the ceiling runs of
`ceilings: true`, DS-Analyzer style (the loader alone, the model alone, and max of the two)."""

from __future__ import annotations

import numpy as np

from loadbench.report.data import CONFIG, LOADER_CONFIG, Results, warm_only
from loadbench.report.tables import Table, _nan, _num, _pct, aggregate, config_name


def bounds_table(results: Results, dataset: str) -> Table | None:
    """Each training configuration's epoch time beside its ceilings, DS-Analyzer style: the
    loader alone (its loader-only twin) and the model alone (the dataset's compute-only run).
    With perfect overlap an epoch takes max(loader, compute); the larger one names the bound.
    None when the dataset has no ceiling runs."""
    ceilings = warm_only(results.ceilings[results.ceilings["dataset"] == dataset])
    computed = ceilings[ceilings["mode"] == "compute-only"].dropna(subset=["epoch_s"])
    loaders = aggregate(ceilings[ceilings["mode"] == "loader-only"], LOADER_CONFIG)
    if computed.empty or loaders.empty:
        return None
    # The model alone, per framework and graph mode (compute-only runs train torch models).
    compute = computed.groupby(["framework", "graph"])["epoch_s"].median()
    loader_s = loaders.set_index(LOADER_CONFIG)["epoch_s"]
    table = aggregate(warm_only(results.runs[results.runs["dataset"] == dataset]), CONFIG)
    table = table.sort_values("epoch_s", na_position="last")
    rows = []
    for _, r in table.iterrows():
        loader = loader_s.get(tuple(r[c] for c in LOADER_CONFIG), np.nan)
        compute_s = compute.get((r["framework"], r["graph"]), np.nan)
        if _nan(loader) or _nan(compute_s) or _nan(r["epoch_s"]):
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
