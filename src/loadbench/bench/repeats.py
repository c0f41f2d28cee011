"""How many repeats each configuration gets, and why it got no more (`repeats.json`).

A fixed count (`repeats: 10`) runs every repeat of every cell. Adaptive repeats (`repeats:
{min: 3, max: 10, ci_pct: 2}`) run `min` rounds, then another round for the cells whose median
steady-state epoch time is not yet known well enough: the 95% interval of the median over the
cell's repeats (`significance.median_ci`) is wider than `ci_pct` percent of the median. No cell
goes beyond `max`. Rounds stay interleaved: round r runs repeat r of every cell still going.

A failed run stops its cell for the rest of the bench: a cell that fails once mostly fails
again (a conversion error, a timeout that costs `timeout_s` each time), and a cell without
times would otherwise run to `max`. Like every failed run, it runs again on the next bench,
and its cell goes on from there. (A fixed count runs every repeat, failed or not, as before.)

Decisions are taken from runs.jsonl after each round, and the interval is seeded, so a resumed
bench takes the same ones; a cell whose next repeat is already recorded keeps it, so moving a
study from a fixed count to adaptive repeats, or to a larger `max`, loses nothing.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from loadbench.bench.experiment import AdaptiveRepeats, Experiment
from loadbench.bench.matrix import Cell, RunSpec, plan_round, run_key
from loadbench.bench.records import read_runs, steady_epochs
from loadbench.significance import median_ci
from loadbench.util import now_iso, write_json_atomic

REPEATS_FILE = "repeats.json"
REPEATS_SCHEMA = 1
FIXED = "fixed count"


def steady_epoch_s(record: dict[str, Any]) -> float | None:
    """A run's steady-state epoch time: the median `time_s` of its epochs after the first, or
    of its only epoch (as the report's `run_row` takes it: the number the interval is of)."""
    epochs = [e for e in record.get("epochs") or [] if isinstance(e, dict)]
    times = [e["time_s"] for e in steady_epochs(epochs) if e.get("time_s") is not None]
    return statistics.median(times) if times else None


def interval_pct(times: list[float]) -> float:
    """The width of the 95% interval of the median of `times`, in percent of the median (NaN
    with fewer than two times)."""
    median, low, high = median_ci(times)
    if math.isnan(low) or not median:
        return math.nan
    return 100 * (high - low) / median


def stop_reason(times: list[float], repeats: int, rule: AdaptiveRepeats) -> str | None:
    """Why a cell that ran `repeats` repeats, with these steady epoch times (one per ok
    repeat), needs no more; None while it needs another."""
    if repeats < rule.min:
        return None
    width = interval_pct(times)
    shown = "n/a" if math.isnan(width) else f"{width:.1f}%"
    if width <= rule.ci_pct:  # NaN (under two times) is never narrow enough
        return f"interval {shown} <= {rule.ci_pct:g}%"
    if repeats >= rule.max:
        return f"max {rule.max} reached (interval {shown} > {rule.ci_pct:g}%)"
    return None


@dataclass
class CellRepeats:
    """Where one cell stands: its runs so far and, once it has stopped, why."""

    label: str
    keys: list[str] = field(default_factory=list)  # its runs, repeat 1 first
    times: list[float] = field(default_factory=list)  # steady epoch times of its ok runs
    failed: int = 0
    stopped: str | None = None
    width_pct: float | None = None  # the interval's width when it stopped

    def stop(self, why: str | None) -> None:
        self.stopped = why
        if why is not None:
            width = interval_pct(self.times)
            self.width_pct = None if math.isnan(width) else round(width, 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": self.keys, "repeats": len(self.keys), "ok": len(self.times),
            "failed": self.failed,
            "epoch_s": statistics.median(self.times) if self.times else None,
            "interval_pct": self.width_pct, "stopped": self.stopped,
        }  # fmt: skip


class RepeatPlan:
    """The rounds of an experiment: which cells run repeat r, decided after each round."""

    def __init__(self, experiment: Experiment, cells: list[Cell]):
        self.experiment = experiment
        self.rule = experiment.adaptive
        self.least, self.most = experiment.repeat_range()
        self.active = [c for c in cells if not c.skip]
        self.states = {id(c): CellRepeats(c.label) for c in self.active}

    def round(self, repeat: int) -> list[RunSpec]:
        """Repeat `repeat` (from 0) of every cell still going; none past the last round."""
        return plan_round(self.experiment, self.active, repeat) if repeat < self.most else []

    def planned(self, after: int, done: set[str]) -> int:
        """Runs not in `done` in the rounds planned after round `after` (-1: before any): the
        rest of the `min` rounds, or the next round while cells still need one."""
        last = max(self.least, after + 2) if self.active else 0
        return sum(
            s.key not in done for r in range(after + 1, min(last, self.most)) for s in self.round(r)
        )

    def after_round(self, repeat: int, specs: list[RunSpec], records: dict[str, dict],
                    done: set[str]) -> None:  # fmt: skip
        """Take in round `repeat` (`specs`, from `round`) as `records` (key -> latest record)
        hold it, and stop the cells that need no more; `done`: the keys recorded ok."""
        ran = repeat + 1
        for spec in specs:
            state = self.states[id(spec.cell)]
            state.keys.append(spec.key)
            why = self._take(state, records.get(spec.key), repeat)
            if why is None and self.rule is None:
                why = FIXED if ran >= self.most else None
            elif why is None:
                why = stop_reason(state.times, ran, self.rule)
                if why and ran < self.most and run_key(spec.settings(), ran) in done:
                    why = None  # its next repeat is recorded already: it costs nothing
            state.stop(why)
        self.active = [c for c in self.active if self.states[id(c)].stopped is None]

    def _take(self, state: CellRepeats, record: dict | None, repeat: int) -> str | None:
        """Count one run of a cell; why the cell stops there (adaptive: a run that failed or
        left no record), else None."""
        if record is not None and record.get("status") == "ok":
            time_s = steady_epoch_s(record)
            if time_s is not None:
                state.times.append(time_s)
            return None
        state.failed += record is not None
        if self.rule is None:
            return None
        if record is None:
            return f"repeat {repeat + 1} was not run"
        error = (record.get("error") or "?").splitlines()[0][:120]
        return f"failed at repeat {repeat + 1}: {error}"

    def to_json(self) -> dict[str, Any]:
        """repeats.json: the rule, and per cell (by label) its runs and why it stopped."""
        rule = {"fixed": self.most} if self.rule is None else self.rule.model_dump()
        cells: dict[str, Any] = {}
        for state in self.states.values():
            label = state.label
            while label in cells:  # two datasets of the same name
                label += " (again)"
            cells[label] = state.to_json()
        return {"schema": REPEATS_SCHEMA, "rule": rule, "updated": now_iso(), "cells": cells}

    def write(self, results_dir: str) -> None:
        write_json_atomic(os.path.join(results_dir, REPEATS_FILE), self.to_json(), indent=1)


def latest_by_key(results_dir: str) -> dict[str, dict[str, Any]]:
    """The last record of every run key in runs.jsonl, as the file holds it."""
    return {r["key"]: r for r in read_runs(results_dir) if isinstance(r, dict) and "key" in r}
