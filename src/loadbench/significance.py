"""Statistics behind every comparison loadbench makes: intervals of a configuration's median
epoch time over its repeats, and (in the report) whether two configurations differ at all.

Seeded throughout, so that a report made twice from the same records says the same thing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def median_ci(values: Sequence[float], confidence: float = CONFIDENCE,
              resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """(median, low, high): the median of `values` and its percentile-bootstrap interval
    (scipy.stats.bootstrap, seeded). NaN values are left out; with fewer than two values the
    interval is (NaN, NaN), and with no values all three are NaN."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(data):
        return math.nan, math.nan, math.nan
    median = float(np.median(data))
    if len(data) < 2:
        return median, math.nan, math.nan
    if np.all(data == data[0]):  # no spread: the interval is the value (scipy warns instead)
        return median, median, median
    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few repeats: scipy warns that the interval is rough
        result = bootstrap((data,), np.median, confidence_level=confidence,
                           n_resamples=resamples, method="percentile",
                           rng=np.random.default_rng(seed))  # fmt: skip
    interval = result.confidence_interval
    return median, float(interval.low), float(interval.high)


# MLPerf Storage, Rules §6.7 "Replicability is mandatory": "Replicated results should be within
# 5% within 5 tries." The rules define the spread no further (their checker counts runs only);
# loadbench reads it as: every repeat within 5% of the configuration's reported median.
SPREAD_LIMIT = 0.05
ALPHA = 0.05


def _clean(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation over the mean; NaN with fewer than two values or a zero mean."""
    data = _clean(values)
    if len(data) < 2 or data.mean() == 0:
        return math.nan
    return float(data.std(ddof=1) / abs(data.mean()))


def spread(values: Sequence[float]) -> float:
    """How far the farthest value lies from the median, as a share of the median (the measure
    behind `SPREAD_LIMIT`); NaN with no values or a zero median."""
    data = _clean(values)
    median = float(np.median(data)) if len(data) else 0.0
    if median == 0:
        return math.nan
    return float(np.max(np.abs(data - median)) / abs(median))


def spread_too_wide(values: Sequence[float], limit: float = SPREAD_LIMIT) -> bool:
    """Whether a repeat lies more than `limit` from the median (MLPerf Storage's 5% rule)."""
    return bool(spread(values) > limit)


def smallest_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided p-value an exact Mann-Whitney test of n_a against n_b values can
    give (every value of one side below every value of the other): 2 / C(n_a + n_b, n_a).
    With 2 repeats each it is 1/3: two repeats never separate two configurations."""
    if n_a < 1 or n_b < 1:
        return 1.0
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


def mann_whitney_p(a: Sequence[float], b: Sequence[float], seed: int = 0) -> float:
    """The p-value of a two-sided Mann-Whitney U test of `a` against `b` (the repeats of two
    configurations): exact for small samples, by exact permutation when values tie, the
    normal approximation for large ones. NaN when a side has no value."""
    x, y = _clean(a), _clean(b)
    if not len(x) or not len(y):
        return math.nan
    pooled = np.concatenate([x, y])
    if np.all(pooled == pooled[0]):
        return 1.0
    from scipy.stats import PermutationMethod, mannwhitneyu

    small = len(pooled) <= 40
    if len(np.unique(pooled)) < len(pooled):  # ties: scipy's exact distribution assumes none
        method = PermutationMethod(n_resamples=9999, rng=np.random.default_rng(seed))
        method = method if small else "asymptotic"
    else:
        method = "exact" if small else "asymptotic"
    return float(mannwhitneyu(x, y, alternative="two-sided", method=method).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (in their order); reject where the
    adjusted value is below alpha. NaN entries are not tests: they stay NaN and are not
    counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(len(p), math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def ratio_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
             resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """(ratio, low, high): median(a) / median(b) and its percentile-bootstrap interval, `a` and
    `b` resampled independently (seeded). All NaN when a side is empty or median(b) is not
    positive; the interval is NaN when neither side has two values."""
    x, y = _clean(a), _clean(b)
    if not len(x) or not len(y) or np.median(y) <= 0:
        return math.nan, math.nan, math.nan
    ratio = float(np.median(x) / np.median(y))
    if len(x) < 2 and len(y) < 2:
        return ratio, math.nan, math.nan
    rng = np.random.default_rng(seed)
    top = np.median(rng.choice(x, (resamples, len(x))), axis=1)
    bottom = np.median(rng.choice(y, (resamples, len(y))), axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(top / bottom, [tail, 1 - tail])
    return ratio, float(low), float(high)


def repeats_to_separate(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA,
                        power: float = 0.8) -> int | None:  # fmt: skip
    """About how many repeats per configuration a two-sided Mann-Whitney test at `alpha` would
    need to tell `a` from `b` with probability `power`, were the observed difference real.

    A normal approximation: the two-sample t-test's n per group, 2 (z(1-alpha/2) + z(power))^2
    / d^2, with d the difference of the medians over the pooled standard deviation, divided by
    the Mann-Whitney test's asymptotic relative efficiency for normal data (3/pi); and never
    fewer than the exact test needs to reach `alpha` at all (`smallest_p`). With few repeats the
    spread is itself rough, so this is "about". Pass alpha divided by the family's size for a
    family corrected by Holm (its strictest step). None when it cannot be told: equal medians
    (no number of repeats separates them) or no spread measured (one value on each side).
    """
    x, y = _clean(a), _clean(b)
    if len(x) + len(y) < 3 or not len(x) or not len(y):
        return None
    difference = abs(float(np.median(x) - np.median(y)))
    if difference == 0:
        return None
    floor = next(n for n in range(2, 10_000) if smallest_p(n, n) <= alpha)
    squares = ((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()
    sd = math.sqrt(squares / (len(x) + len(y) - 2))
    if sd == 0:
        return floor
    from scipy.stats import norm

    t_test = 2 * (norm.ppf(1 - alpha / 2) + norm.ppf(power)) ** 2 / (difference / sd) ** 2
    return max(floor, math.ceil(t_test / (3 / math.pi)))


def letter_groups(names: Sequence, different) -> dict:
    """Compact letter display (Piepho's insert-absorb): each name gets letters so that two
    names share a letter unless `different(a, b)`; letters a, b, ... follow the order of
    `names` (pass them fastest first: the fastest is in group a).

    Args:
        names: hashable labels, in display order.
        different: different(a, b) -> bool, for a before b in `names`.
    Returns:
        {name: letters}, e.g. {"npy": "a", "zarr": "ab", "files-png": "b"}.
    """
    columns = [frozenset(names)] if names else []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if not different(a, b):
                continue
            split = set()
            for column in columns:
                if a in column and b in column:
                    split |= {column - {a}, column - {b}}
                else:
                    split.add(column)
            columns = [c for c in split if c and not any(c < other for other in split)]
    position = {name: i for i, name in enumerate(names)}
    columns.sort(key=lambda c: sorted(position[n] for n in c))
    labels = [(_letter(i), column) for i, column in enumerate(columns)]
    return {n: "".join(letter for letter, column in labels if n in column) for n in names}


def _letter(i: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return alphabet[i] if i < len(alphabet) else f"<{i + 1}>"
