"""What an experiment will cost before it runs: its runs, and an estimate of their wall time.

A configuration (cell) is priced per run, from what is known best:
1. its own earlier runs in the results directory (their `wall_s`);
2. else the earlier runs most like it (same dataset and format, then the same format and
   access on another dataset, ...), scaled by epochs x images x pixels per image;
3. else a calibration of a few seconds on this machine (`calibrate.py`).
Plus the conversions of the stores --stores lacks, and the start of the template process.

What it leaves out: cold-cache runs are priced as warm ones, runs on object storage only from
earlier runs, DataLoader workers as a plain division of the loading time, and a machine that
is busier (or idler) during the experiment than during the calibration.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loadbench.bench.calibrate import (
    RUN_START_S,
    TEMPLATE_START_S,
    Calibration,
    Size,
    dataset_id,
)
from loadbench.bench.experiment import Experiment
from loadbench.bench.matrix import Cell, expand, plan_round
from loadbench.bench.records import RecordedOk, read_runs

# What an earlier run must share with a cell to price it, most alike first.
SIMILAR = (
    ("dataset", "format", "dtype", "access", "workers", "mode", "cache", "shuffle", "storage"),
    ("dataset", "format", "dtype", "access", "mode"),
    ("dataset", "format", "mode"),
    ("format", "dtype", "access", "workers", "mode"),
    ("format", "mode"),
    ("dataset", "mode"),
)


@dataclass
class Estimate:
    """The pending runs (fewest and most: adaptive repeats) and what they will cost."""

    runs: tuple[int, int]
    done: int  # runs of the experiment recorded ok already
    run_s: list[float] = field(default_factory=lambda: [0.0, 0.0])
    convert_s: float = 0.0
    start_s: float = 0.0
    how: Counter = field(default_factory=Counter)  # cells priced by: recorded, similar, ...
    unknown: dict[str, int] = field(default_factory=dict)  # why a cell has no price -> cells
    notes: list[str] = field(default_factory=list)
    took_s: float = 0.0

    @property
    def total_s(self) -> tuple[float, float]:
        """The whole bench: the runs, the conversions, and the template's start if it runs."""
        least, most = self.runs
        return (self.run_s[0] + self.convert_s + (self.start_s if least else 0.0),
                self.run_s[1] + self.convert_s + (self.start_s if most else 0.0))  # fmt: skip

    @property
    def known(self) -> bool:
        return bool(self.how) or not self.runs[1]


def estimate(experiment: Experiment, results_dir: str | None, stores_dir: str,
             calibrate: bool = True) -> Estimate:  # fmt: skip
    """The runs `experiment` has left to run into `results_dir` and their wall time, from its
    earlier runs and (with `calibrate`) a calibration of a few seconds on this machine."""
    started = time.perf_counter()
    least, most = experiment.repeat_range()
    cells = [c for c in expand(experiment) if not c.skip]
    history = History(results_dir)
    keys = {id(c): [plan_round(experiment, [c], r)[0].key for r in range(most)] for c in cells}
    pending = {id(c): (sum(k not in history.done for k in keys[id(c)][:least]),
                       sum(k not in history.done for k in keys[id(c)])) for c in cells}  # fmt: skip
    result = Estimate(
        runs=(sum(p[0] for p in pending.values()), sum(p[1] for p in pending.values())),
        done=sum(k in history.done for cell_keys in keys.values() for k in cell_keys),
    )
    prices: dict[int, float] = {}
    for cell in cells:
        price, how = history.price(experiment, cell, keys[id(cell)])
        if price is not None:
            prices[id(cell)] = price
            result.how[how] += 1
    rest = [c for c in cells if id(c) not in prices and sum(pending[id(c)])]
    if rest and calibrate:
        calibration = Calibration(experiment, stores_dir)
        try:
            for cell in rest:
                price, why = calibration.price(cell)
                if price is None:
                    result.unknown[why] = result.unknown.get(why, 0) + 1
                else:
                    prices[id(cell)] = price
                    result.how["calibrated here"] += 1
        finally:
            calibration.close()
        result.convert_s, result.start_s = calibration.convert_s(), calibration.start_s
        if any(c.cache == "cold" for c in rest):
            result.notes.append("cold-cache runs are priced as warm ones")
    elif rest:
        result.unknown["no earlier run like it, and --no-calibrate"] = len(rest)
        result.start_s = TEMPLATE_START_S
    else:
        result.start_s = TEMPLATE_START_S
    for cell in cells:
        for i in (0, 1):
            result.run_s[i] += pending[id(cell)][i] * prices.get(id(cell), 0.0)
    result.took_s = time.perf_counter() - started
    return result


class History:
    """The earlier runs of a results directory that finished ok, by key and by likeness."""

    def __init__(self, results_dir: str | None):
        exists = results_dir is not None and os.path.isdir(results_dir)
        self.done = RecordedOk(results_dir).current() if exists else set()
        runs = read_runs(results_dir) if exists else []
        runs = [r for r in runs if isinstance(r, dict) and r.get("status") == "ok"
                and r.get("wall_s") and isinstance(r.get("settings"), dict)]  # fmt: skip
        self.by_key = {r["key"]: r for r in runs}
        self.sizes: dict[str, Size] = {}
        self.alike: list[dict[tuple, list[float]]] = [{} for _ in SIMILAR]  # level -> units
        for r in runs:
            attributes, unit = _attributes_of(r), _unit_s(r)
            if (size := _record_size(r)) is not None:
                self.sizes[attributes["dataset"]] = size
            for level, units in zip(SIMILAR, self.alike, strict=True):
                if unit is not None:
                    units.setdefault(tuple(attributes[a] for a in level), []).append(unit)

    def price(self, experiment: Experiment, cell: Cell,
              keys: list[str]) -> tuple[float | None, str]:  # fmt: skip
        """Seconds per run of `cell` (whose runs have `keys`) from its own earlier runs, else
        scaled from the most alike; None when none is alike enough, or its size is unknown."""
        own = [self.by_key[k]["wall_s"] for k in keys if k in self.by_key]
        if own:
            return statistics.median(own), "from their earlier runs"
        size = self.sizes.get(dataset_id(cell.dataset))
        if size is None:
            return None, ""
        mine = _attributes(cell, cell.mode or experiment.mode)
        for level, units in zip(SIMILAR, self.alike, strict=True):
            found = units.get(tuple(mine[a] for a in level))
            if found:
                work = experiment.epochs * size.images * size.values
                return RUN_START_S + statistics.median(found) * work, "scaled from runs like them"
        return None, ""


def _attributes(cell: Cell, mode: str) -> dict[str, Any]:
    return {"dataset": dataset_id(cell.dataset), "format": cell.format, "dtype": cell.dtype,
            "access": cell.access, "workers": cell.workers, "mode": mode, "cache": cell.cache,
            "shuffle": cell.shuffle, "storage": cell.storage.label}  # fmt: skip


def _attributes_of(record: dict[str, Any]) -> dict[str, Any]:
    names = ("format", "dtype", "access", "workers", "mode", "cache", "shuffle", "storage")
    return {"dataset": dataset_id(record["settings"].get("dataset", {})),
            **{k: record.get(k) for k in names}}  # fmt: skip


def _record_size(record: dict[str, Any]) -> Size | None:
    store = record.get("store") or {}
    counts, shape = store.get("images"), store.get("image_shape")
    if not counts or not shape:
        return None
    return Size(dict(counts), math.prod(shape))


def _unit_s(record: dict[str, Any]) -> float | None:
    """Seconds of a run past its start, per epoch, image and pixel value."""
    size = _record_size(record)
    epochs = len(record.get("epochs") or []) or record.get("epochs_planned")
    if size is None or not epochs:
        return None
    return max(0.0, record["wall_s"] - RUN_START_S) / (epochs * size.images * size.values)


def say_seconds(seconds: float) -> str:
    """4 s, 12 min, 3 h 20 min, 2 d 5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(round(minutes), 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
