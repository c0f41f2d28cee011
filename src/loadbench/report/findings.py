"""A few sentences computed from the data: what a reader should take away.

A sentence that compares two timings claims a difference only where the report's tests find
one (`comparisons.py`: a Mann-Whitney test over repeats, Holm's correction over every
comparison of the report), and then carries the ratio of the medians with its interval;
otherwise it says that the two are indistinguishable with the repeats run, and about how many
repeats would separate them. Sizes on disk are deterministic and need no test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from loadbench.report.comparisons import (
    CHANCE_MARGIN,
    Comparisons,
    chance_level,
    comparisons,
    config_key,
    flag,
    learnt,
    lossless_twins,
)
from loadbench.report.data import CONFIG, Results, warm_only
from loadbench.report.tables import SEED, aggregate, config_name, with_interval
from loadbench.significance import ALPHA, ratio_ci, repeats_to_separate

# Beyond this many repeats, "about N" is not advice any more: the difference is noise-sized.
MOST_REPEATS = 50


def findings(results: Results) -> list[str]:
    family = comparisons(results)
    out = [_method(family)]
    runs = results.runs
    for ds in results.datasets:
        part = runs[runs["dataset"] == ds]
        stats = aggregate(warm_only(part), CONFIG).dropna(subset=["epoch_s"])
        stats = stats.sort_values("epoch_s").reset_index(drop=True)
        out += _leaders(family, stats, ds)
        out += _storage(part, ds)
        out += _stalled(stats, ds)
        out += _accuracy(warm_only(part), ds, family)
        out += _cold(part, ds, family)
    out += _dtypes(runs, family)
    out += _workers(runs, family)
    return out


def _method(family: Comparisons) -> str:
    return (
        "How to read these: a configuration is called faster than another only where a "
        "two-sided Mann-Whitney test over their repeats rejects at 5% after Holm's correction "
        f"over all {family.count} comparisons this report makes; the sentence then gives the "
        "ratio of the medians with its 95% bootstrap interval. Otherwise the two are "
        "indistinguishable with the repeats run, and the sentence says about how many repeats "
        "would likely separate them."
    )


# -- timings -------------------------------------------------------------------------------------


def _leaders(family: Comparisons, stats: pd.DataFrame, ds: str) -> list[str]:
    """The fastest configuration, whether the next one is really slower, how many are tied
    with it, and the fastest against the slowest."""
    if len(stats) < 2:
        return []
    fast, nxt, slow = stats.iloc[0], stats.iloc[1], stats.iloc[-1]
    tied = [config_name(r) for _, r in stats.iloc[1:].iterrows()
            if not family.differs("epoch", ds, config_key(fast), config_key(r))]  # fmt: skip
    interval = with_interval(fast["epoch_s"], fast["epoch_ci_low"], fast["epoch_ci_high"])
    text = f"On {ds}, {config_name(fast)} had the fastest median epoch ({interval} s)"
    if not tied:
        others = "the other configuration" if len(stats) == 2 else f"all {len(stats) - 1} others"
        text += f" and was faster than {others}"
    elif len(tied) == len(stats) - 1:  # nothing is established: said before the name
        text = (f"On {ds}, the tests tell none of the other {len(tied)} configurations apart from "
                f"the fastest median ({config_name(fast)}, {interval} s), so which is fastest "
                "is not established: another run may put another first")  # fmt: skip
    else:
        listed = ", ".join(tied[:4]) + (f" and {len(tied) - 4} more" if len(tied) > 4 else "")
        text += (
            f"; {len(tied)} of the other {len(stats) - 1} configurations are statistically "
            f"tied with it ({listed})"
        )
    out = [text + ".", versus(family, ds, fast, nxt, "the next fastest")]
    if len(stats) > 2:
        out.append(versus(family, ds, fast, slow, "the slowest"))
    return out


def versus(family: Comparisons, ds: str, fast: pd.Series, slow: pd.Series, which: str) -> str:
    """'On ds, A was faster than B (which): B took 1.62x [1.48-1.77] as long per epoch ...', or
    that they are indistinguishable and how many repeats would separate them."""
    a, b = config_key(fast), config_key(slow)
    x, y = family.values("epoch", ds, a), family.values("epoch", ds, b)
    test = family.test("epoch", ds, a, b)
    name_a, name_b = config_name(fast), config_name(slow)
    medians = f"{np.median(x):.3f} vs {np.median(y):.3f} s per epoch"
    if test is not None and test.differs:
        return (
            f"On {ds}, {name_a} was faster than {name_b} ({which}): {name_b} took "
            f"{ratio_text(y, x)} as long ({medians}; Holm-adjusted p = "
            f"{test.p_holm:.2g})."
        )
    return (
        f"On {ds}, {name_a} and {name_b} ({which}) are indistinguishable with "
        f"{_repeats(x, y)} ({medians}; {_p(test)}); {_needed(x, y, family)}."
    )


def ratio_text(top: np.ndarray, bottom: np.ndarray) -> str:
    """'1.62x [1.48-1.77]': median(top) / median(bottom) and its bootstrap interval."""
    ratio, low, high = ratio_ci(top, bottom, seed=SEED)
    if np.isnan(low):
        return f"{ratio:.2f}x"
    return f"{ratio:.2f}x [{low:.2f}-{high:.2f}]"


def _repeats(x: np.ndarray, y: np.ndarray) -> str:
    if len(x) == len(y):
        return _plural(len(x), "repeat")
    return f"{len(x)} and {len(y)} repeats"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _p(test) -> str:
    return "not tested" if test is None else f"Holm-adjusted p = {test.p_holm:.2f}"


def _needed(x: np.ndarray, y: np.ndarray, family: Comparisons) -> str:
    """About how many repeats per configuration would separate x from y, as a clause."""
    n = repeats_to_separate(x, y, alpha=ALPHA / max(family.count, 1))
    if n is None:
        if len(x) < 2 and len(y) < 2:
            return "one repeat each cannot tell how many would separate them"
        return "their medians are equal: no number of repeats would separate them"
    if n > MOST_REPEATS:
        return (
            f"more than {MOST_REPEATS} repeats per configuration would be needed to separate "
            "them: the difference is small against the run-to-run noise"
        )
    return f"about {n} repeats per configuration would likely separate them"


def _typical_needed(pairs: list[tuple[np.ndarray, np.ndarray]], family: Comparisons) -> str:
    """The median over pairs of the repeats that would separate each, as a clause."""
    needed = [repeats_to_separate(x, y, alpha=ALPHA / max(family.count, 1)) for x, y in pairs]
    needed = [n for n in needed if n is not None]
    if not needed:
        return "more repeats are needed even to estimate how many would separate them"
    n = int(np.median(needed))
    if n > MOST_REPEATS:
        return f"the typical difference would take more than {MOST_REPEATS} repeats to establish"
    return f"about {n} repeats per configuration would likely establish the typical one"


def _stalled(stats: pd.DataFrame, ds: str) -> list[str]:
    stalled = stats[stats["stall_share"] > 0.3].sort_values("stall_share", ascending=False)
    if stalled.empty:
        return []
    worst = stalled.iloc[0]
    return [
        f"On {ds}, {config_name(worst)} spent {100 * worst['stall_share']:.0f}% of its "
        "epochs waiting for data: the loader, not the model, set its pace."
    ]


def _cold(part: pd.DataFrame, ds: str, family: Comparisons) -> list[str]:
    """How much longer a cold page cache made the first epoch, claimed per configuration only
    where the tests establish it."""
    tests = [t for t in family.tests.values() if t.kind == "cold" and t.dataset == ds]
    if not tests:
        return []
    pairs = {t.a: (family.values("first_cold", ds, t.a), family.values("first_warm", ds, t.a))
             for t in tests}  # fmt: skip
    ratios = {c: np.median(cold) / np.median(warm) for c, (cold, warm) in pairs.items()}
    worst = max(ratios, key=ratios.get)
    text = (
        f"On {ds}, a cold page cache made the first epoch {np.median(list(ratios.values())):.2f}x "
        f"as long (median over {len(ratios)} configurations; "
        f"{config_name(dict(zip(CONFIG, worst, strict=True)))} {ratio_text(*pairs[worst])})"
    )
    established = [t for t in tests if t.differs]
    if established:
        text += f"; the tests establish a longer cold first epoch for {len(established)} of them"
    else:
        cold, warm = pairs[worst]
        text += (
            f"; with {_repeats(cold, warm)} the tests establish it for none of them: "
            f"{_typical_needed(list(pairs.values()), family)}"
        )
    return [text + "."]


def _dtypes(runs: pd.DataFrame, family: Comparisons) -> list[str]:
    if runs["dtype"].nunique() < 2 or "uint8" not in set(runs["dtype"]):
        return []
    stats = aggregate(warm_only(runs), ["dataset", *CONFIG])
    by_twin = stats.set_index(["dataset", *CONFIG])["epoch_s"]
    out = []
    for dtype in ("float16", "float32"):
        pairs = []  # (dataset, this config, its uint8 twin)
        for _, row in stats[stats["dtype"] == dtype].iterrows():
            twin = config_key({**row, "dtype": "uint8"})
            if (row["dataset"], *twin) in by_twin.index:
                pairs.append((row["dataset"], config_key(row), twin))
        if pairs:
            out.append(_dtype_sentence(dtype, pairs, family))
    return out


def _dtype_sentence(dtype: str, pairs: list, family: Comparisons) -> str:
    samples = [(family.values("epoch", ds, a), family.values("epoch", ds, b)) for ds, a, b in pairs]
    ratios = [np.median(x) / np.median(y) for x, y in samples]
    text = (
        f"Stored as {dtype}, epochs took {np.median(ratios):.2f}x the time of uint8 (median "
        f"over {len(pairs)} format/dataset pairs)"
    )
    established = [i for i, (ds, a, b) in enumerate(pairs) if family.differs("epoch", ds, a, b)]
    if established:
        i = max(established, key=lambda k: abs(np.log(ratios[k])))
        ds, a, _b = pairs[i]
        text += (
            f"; the tests establish a difference for {len(established)} of them (largest: "
            f"{a[0]} on {ds}, {ratio_text(*samples[i])})"
        )
    else:
        x, y = samples[0]
        text += (
            f"; with {_repeats(x, y)} the tests establish a difference for none of them: "
            f"{_typical_needed(samples, family)}"
        )
    return text + "."


def _workers(runs: pd.DataFrame, family: Comparisons) -> list[str]:
    if runs["workers"].nunique() < 2:
        return []
    stats = aggregate(warm_only(runs), ["dataset", *CONFIG])
    lines = ["dataset", *(c for c in CONFIG if c != "workers")]
    out = []
    for _, part in stats.groupby(lines, sort=False, dropna=False):
        part = part.dropna(subset=["images_per_s"]).sort_values("workers")
        if len(part) < 2 or part["images_per_s"].iloc[0] <= 0:
            continue
        base, best = part.iloc[0], part.loc[part["images_per_s"].idxmax()]
        if best["images_per_s"] / base["images_per_s"] > 1.2:
            out.append(_workers_sentence(family, base, best))
    return out[:6]


def _workers_sentence(family: Comparisons, base: pd.Series, best: pd.Series) -> str:
    ds, a, b = base["dataset"], config_key(base), config_key(best)
    slow, fast = family.values("epoch", ds, a), family.values("epoch", ds, b)
    name = f"{base['format']}/{base['dtype']}/{base['access']}"
    more, fewer = int(best["workers"]), int(base["workers"])
    test = family.test("epoch", ds, a, b)
    if test is not None and test.differs:
        return (
            f"On {ds}, {name} was faster with {more} workers than with {fewer}: an epoch with "
            f"{fewer} took {ratio_text(slow, fast)} as long (Holm-adjusted p = {test.p_holm:.2g})."
        )
    gain = best["images_per_s"] / base["images_per_s"]
    return (
        f"On {ds}, {name} with {more} and with {fewer} workers is indistinguishable with "
        f"{_repeats(fast, slow)} ({gain:.1f}x the images per second observed; {_p(test)}); "
        f"{_needed(fast, slow, family)}."
    )


# -- sizes and accuracy --------------------------------------------------------------------------


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


def _accuracy(warm: pd.DataFrame, ds: str, family: Comparisons) -> list[str]:
    """Whether the model learnt at all; then whether lossless formats agree exactly at equal
    seeds (they must) and whether lossy ones differ from their lossless twins."""
    medians = warm.groupby(CONFIG, dropna=False)["final_accuracy"].median().dropna()
    if medians.empty:
        return []
    chance = chance_level(warm)
    if chance is not None and not learnt(warm):
        return [
            f"On {ds}, the model did not learn in this experiment: final accuracy "
            f"{medians.min():.3f}-{medians.max():.3f} against a chance level of {chance[0]:.3f} "
            f"({chance[1]} classes; within {100 * CHANCE_MARGIN:.0f} points of it), so these "
            "runs cannot tell whether the format changes what the model learns."
        ]
    out = _lossless_parity(warm, ds) + _lossy(warm, ds, family)
    if chance is None and out:
        out[0] += " (The class count was not recorded: chance level is unknown.)"
    return out


def _lossless_parity(warm: pd.DataFrame, ds: str) -> list[str]:
    lossless = warm[[flag(v) is False for v in warm["lossy"]]].dropna(subset=["final_accuracy"])
    if lossless["format"].nunique() < 2:
        return []
    same = [c for c in CONFIG if c != "format"] + ["seed"]
    groups = [g for _, g in lossless.groupby(same, dropna=False) if g["format"].nunique() > 1]
    if not groups:
        return []
    differing = [g for g in groups if g["final_accuracy"].nunique() > 1]
    formats = lossless["format"].nunique()
    if not differing:
        values = sorted({round(float(v), 4) for g in groups for v in g["final_accuracy"]})
        seeds = len({s for g in groups for s in g["seed"]})
        shown = f"{values[0]:.3f}" if len(values) == 1 else f"{values[0]:.3f}-{values[-1]:.3f}"
        return [
            f"On {ds}, the {formats} lossless formats reached exactly the same final accuracy "
            f"at every repeat seed ({_plural(seeds, 'seed')}; {shown}): with equal seeds the "
            "format did not change what the model learnt."
        ]
    example = differing[0].drop_duplicates("final_accuracy").iloc[:2]
    shown = ", ".join(f"{r['format']} {r['final_accuracy']:.3f}" for _, r in example.iterrows())
    return [
        f"On {ds}, lossless formats reached different final accuracies at equal seeds "
        f"({len(differing)} of {len(groups)} seed groups; e.g. seed {example['seed'].iloc[0]}: "
        f"{shown}): identical images did not give identical training here (nondeterministic "
        "kernels or timing), so accuracy differences between formats are that noise, not "
        "the stored data."
    ]


def _lossy(warm: pd.DataFrame, ds: str, family: Comparisons) -> list[str]:
    out = []
    for lossy, twin in lossless_twins(warm).items():
        test = family.test("accuracy", ds, lossy, twin)
        if test is None:
            continue
        x, y = family.values("accuracy", ds, lossy), family.values("accuracy", ds, twin)
        name, other = (config_name(dict(zip(CONFIG, c, strict=True))) for c in (lossy, twin))
        accuracies = f"{np.median(x):.3f} vs {np.median(y):.3f}"
        if test.differs:
            out.append(
                f"On {ds}, lossy {name} reached a different final accuracy than lossless "
                f"{other}: {accuracies} ({100 * (np.median(x) - np.median(y)):+.1f} points; "
                f"Holm-adjusted p = {test.p_holm:.2g})."
            )
        else:
            out.append(
                f"On {ds}, the final accuracy of lossy {name} and of lossless {other} "
                f"({accuracies}) is indistinguishable with {_repeats(x, y)} ({_p(test)})."
            )
    return out
