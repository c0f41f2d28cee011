"""Every comparison the report makes, tested over repeats and corrected as one family.

A table's tie groups, the summary's tied leaders and the findings' "faster than" all read the
same tests: a two-sided Mann-Whitney test of two configurations' repeats, its p-value adjusted
by Holm over every test of the report. Tested are: every pair of configurations of a dataset
(steady-state epoch time, warm cache), each configuration's first epoch cold against warm (when
both caches ran), and each lossy configuration's final accuracy against its lossless twin (when
the model learnt). Computed once per results directory (`Results.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from loadbench.report.data import CONFIG, Results, warm_only
from loadbench.significance import ALPHA, holm, letter_groups, mann_whitney_p

# Accuracy within this of chance (1 / classes) is a model that did not learn.
CHANCE_MARGIN = 0.05

Config = tuple  # the CONFIG values of a configuration


@dataclass(frozen=True)
class Test:
    # "epoch": two configurations a and b; "cold": a's first epoch cold vs warm (b = a);
    # "accuracy": a lossy configuration a and its lossless twin b
    kind: str
    dataset: str
    a: Config
    b: Config
    p: float
    p_holm: float

    @property
    def differs(self) -> bool:
        return bool(self.p_holm < ALPHA)


@dataclass
class Comparisons:
    tests: dict[tuple[str, str, Config, Config], Test] = field(default_factory=dict)
    # (measure, dataset, configuration) -> its values over repeats; measures: "epoch" (warm
    # steady state), "first_warm", "first_cold" (first epoch), "accuracy" (final, warm)
    samples: dict[tuple[str, str, Config], np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """The family's size: how many tests the Holm correction is over."""
        return len(self.tests)

    def test(self, kind: str, dataset: str, a: Config, b: Config) -> Test | None:
        return self.tests.get((kind, dataset, a, b)) or self.tests.get((kind, dataset, b, a))

    def differs(self, kind: str, dataset: str, a: Config, b: Config) -> bool:
        test = self.test(kind, dataset, a, b)
        return test is not None and test.differs

    def values(self, measure: str, dataset: str, config: Config) -> np.ndarray:
        return self.samples.get((measure, dataset, config), np.array([]))

    def letters(self, dataset: str, order: list[Config]) -> dict[Config, str]:
        """Tie groups of the dataset's configurations (`order`: fastest first)."""
        return letter_groups(order, lambda a, b: self.differs("epoch", dataset, a, b))


def config_key(row) -> Config:
    return tuple(row[c] for c in CONFIG)


def comparisons(results: Results) -> Comparisons:
    """The report's family of tests (computed once per `results`)."""
    if "comparisons" not in results.cache:
        results.cache["comparisons"] = _family(results)
    return results.cache["comparisons"]


def _family(results: Results) -> Comparisons:
    samples: dict[tuple[str, str, Config], np.ndarray] = {}
    pairs: list[tuple[str, str, Config, Config]] = []
    for ds in results.datasets:
        part = results.runs[results.runs["dataset"] == ds]
        warm = warm_only(part)
        epochs = _samples(warm, "epoch_s")
        samples |= {("epoch", ds, c): v for c, v in epochs.items()}
        pairs += [("epoch", ds, a, b) for a, b in combinations(_fastest_first(epochs), 2)]
        if {"warm", "cold"} <= set(part["cache"]):
            first = {cache: _samples(part[part["cache"] == cache], "first_epoch_s")
                     for cache in ("warm", "cold")}  # fmt: skip
            for cache, values in first.items():
                samples |= {(f"first_{cache}", ds, c): v for c, v in values.items()}
            pairs += [("cold", ds, c, c) for c in first["cold"] if c in first["warm"]]
        if learnt(warm):
            accuracy = _samples(warm, "final_accuracy")
            samples |= {("accuracy", ds, c): v for c, v in accuracy.items()}
            pairs += [("accuracy", ds, a, b) for a, b in lossless_twins(warm).items()
                      if a in accuracy and b in accuracy]  # fmt: skip
    p = [_p(kind, ds, a, b, samples) for kind, ds, a, b in pairs]
    adjusted = holm(p)
    tests = {key: Test(*key, p[i], adjusted[i]) for i, key in enumerate(pairs)}
    return Comparisons(tests, samples)


def _p(kind: str, ds: str, a: Config, b: Config, samples) -> float:
    if kind == "cold":
        return mann_whitney_p(samples[("first_cold", ds, a)], samples[("first_warm", ds, a)])
    return mann_whitney_p(samples[(kind, ds, a)], samples[(kind, ds, b)])


def _samples(runs: pd.DataFrame, column: str) -> dict[Config, np.ndarray]:
    """Each configuration's values of `column` over its repeats (configurations without one
    are left out)."""
    out = {}
    for key, part in runs.groupby(CONFIG, sort=False, dropna=False):
        values = part[column].dropna().to_numpy(dtype=float)
        if len(values):
            out[tuple(key)] = values
    return out


def _fastest_first(samples: dict[Config, np.ndarray]) -> list[Config]:
    return sorted(samples, key=lambda c: float(np.median(samples[c])))


def chance_level(runs: pd.DataFrame) -> tuple[float, int] | None:
    """(1 / classes, classes) of the runs' dataset; None when no run recorded its classes."""
    classes = runs["classes"].dropna() if "classes" in runs else pd.Series(dtype=float)
    if classes.empty or classes.max() < 1:
        return None
    count = int(classes.max())
    return 1 / count, count


def learnt(runs: pd.DataFrame) -> bool:
    """Whether the model learnt at all: some configuration's median final accuracy more than
    `CHANCE_MARGIN` above chance. True when chance is unknown and accuracy was measured (the
    parity checks still run; the finding says that chance is unknown)."""
    medians = runs.groupby(CONFIG, dropna=False)["final_accuracy"].median().dropna()
    if medians.empty:
        return False
    chance = chance_level(runs)
    return chance is None or float(medians.max()) > chance[0] + CHANCE_MARGIN


def lossless_twins(runs: pd.DataFrame) -> dict[Config, Config]:
    """Each lossy configuration's lossless twin: the same dtype, access, workers, order,
    storage and world size in a lossless format (npy when it ran, else the first by name)."""
    kinds = {c: flag(v) for c, v in runs.groupby(CONFIG, dropna=False)["lossy"].first().items()}
    lossless = sorted((c for c, lossy in kinds.items() if lossy is False),
                      key=lambda c: (c[0] != "npy", c[0]))  # fmt: skip
    twins = {}
    for config, lossy in kinds.items():
        twin = next((c for c in lossless if c[1:] == config[1:]), None)
        if lossy and twin is not None:
            twins[config] = twin
    return twins


def flag(value) -> bool | None:
    """A yes/no column's value (True, False, or None where it is not known)."""
    return None if value is None or pd.isna(value) else bool(value)
