"""The statistics behind the report's claims, on synthetic repeats of known distributions: no
difference is claimed where there is none, a real one is found, intervals cover, and the
report's findings and headline table follow the tests."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from loadbench.report.comparisons import comparisons
from loadbench.report.data import RUN_COLUMNS, Results
from loadbench.report.findings import findings
from loadbench.report.tables import dataset_table, summary_table
from loadbench.significance import (
    coefficient_of_variation,
    holm,
    letter_groups,
    mann_whitney_p,
    median_ci,
    ratio_ci,
    repeats_to_separate,
    smallest_p,
    spread,
    spread_too_wide,
)


def _results(configs: dict[tuple[str, str], np.ndarray], accuracy=None, classes=10,
             lossy=("files-jpeg",)) -> Results:  # fmt: skip
    """A Results of warm train runs: configs maps (dataset, format) to the epoch times of its
    repeats; accuracy maps (dataset, format) to final accuracies per repeat (default 0.9)."""
    rows = []
    for (ds, fmt), times in configs.items():
        for repeat, time_s in enumerate(times):
            acc = accuracy[ds, fmt][repeat] if accuracy else 0.9
            rows.append({
                "key": f"{ds}-{fmt}-{repeat}", "dataset": ds, "format": fmt, "dtype": "uint8",
                "access": "sample", "workers": 0, "shuffle": "exact", "cache": "warm",
                "mode": "train", "repeat": repeat, "seed": repeat, "epochs": 2,
                "epoch_s": float(time_s), "first_epoch_s": float(time_s) * 1.2,
                "images_per_s": 1000 / float(time_s), "final_accuracy": acc,
                "classes": classes, "lossy": fmt in lossy, "storage": "local", "world_size": 1,
                "bytes_per_image": 100.0, "store_bytes": 1e5, "framework": "torch",
                "graph": "eager",
            })  # fmt: skip
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return Results("synthetic", runs, pd.DataFrame(), [], {}, {}, 1)


# -- the tests themselves ------------------------------------------------------------------------


def test_identical_configurations_are_rarely_called_different():
    rng = np.random.default_rng(0)
    raw, raw_any, corrected = 0, 0, 0
    for _ in range(200):
        samples = [rng.normal(1.0, 0.02, 10) for _ in range(4)]
        p = [mann_whitney_p(a, b) for i, a in enumerate(samples) for b in samples[i + 1 :]]
        raw += p[0] < 0.05
        raw_any += any(q < 0.05 for q in p)
        corrected += any(q < 0.05 for q in holm(p))
    assert raw / 200 <= 0.08  # the nominal 5%, give or take the simulation's noise
    # six comparisons at once: uncorrected, some "difference" turns up far more often than 5%;
    # after Holm, about 5% of the families (or fewer) claim any
    assert raw_any / 200 > 0.12 and corrected / 200 <= 0.08


def test_two_repeats_never_separate_anything():
    assert smallest_p(2, 2) == pytest.approx(1 / 3)
    assert mann_whitney_p([1.0, 1.01], [5.0, 5.01]) == pytest.approx(1 / 3)
    assert smallest_p(4, 4) < 0.05 < smallest_p(3, 3)


def test_a_20_percent_slower_configuration_is_found():
    rng = np.random.default_rng(1)
    fast, slow = rng.normal(1.0, 0.02, 10), rng.normal(1.2, 0.024, 10)
    assert mann_whitney_p(fast, slow) < 1e-4
    ratio, low, high = ratio_ci(slow, fast)
    assert 1.15 < low < ratio < high < 1.25 and ratio == pytest.approx(1.2, abs=0.03)
    text = " ".join(findings(_results({("d", "npy"): fast, ("d", "zarr"): slow}))[1:])
    assert "On d, npy/uint8/sample/w0 was faster than zarr/uint8/sample/w0" in text
    assert re.search(r"took 1\.(19|2\d)x \[1\.\d\d-1\.\d\d\] as long", text)
    assert "indistinguishable" not in text


def test_with_two_repeats_the_finding_says_how_many_would_separate_them():
    results = _results({("d", "npy"): [1.0, 1.02], ("d", "zarr"): [1.6, 1.62]})
    text = " ".join(findings(results)[1:])  # [0]: how the claims are made
    assert "faster than" not in text
    assert "are indistinguishable with 2 repeats" in text
    assert "about 4 repeats per configuration would likely separate them" in text
    assert comparisons(results).count == 1


def test_median_ci_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    for seed in range(200):
        _, low, high = median_ci(rng.lognormal(0.0, 0.1, 10), seed=seed)  # true median 1
        covered += low <= 1.0 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_holm_adjusts_step_down_and_skips_what_was_not_tested():
    adjusted = holm([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[:3] + adjusted[4:] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[3])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_letter_groups_share_a_letter_unless_different():
    different = {("A", "C"), ("A", "D"), ("B", "D")}
    letters = letter_groups(list("ABCD"), lambda a, b: (a, b) in different)
    assert letters == {"A": "a", "B": "ab", "C": "bc", "D": "c"}
    assert letter_groups(list("ABC"), lambda a, b: False) == {"A": "a", "B": "a", "C": "a"}
    assert letter_groups(["x"], lambda a, b: True) == {"x": "a"}


def test_the_dataset_table_groups_ties_and_flags_spread():
    rng = np.random.default_rng(3)
    results = _results({
        ("d", "npy"): rng.normal(1.0, 0.01, 10), ("d", "zarr"): rng.normal(1.0, 0.01, 10),
        ("d", "hdf5"): rng.normal(1.5, 0.01, 10), ("d", "lmdb"): [1.0, 1.3] * 5,
    })  # fmt: skip
    table = dataset_table(results, "d")
    rows = {row[1].split("/")[0]: dict(zip(table.columns, row, strict=True)) for row in table.rows}
    assert rows["npy"]["group"] == rows["zarr"]["group"] == "a"
    assert "a" not in rows["hdf5"]["group"]
    assert rows["lmdb"]["CV"].endswith("⚠") and not rows["npy"]["CV"].endswith("⚠")
    assert any("MLPerf Storage" in note for note in table.notes)
    assert re.fullmatch(r"(0\.9|1\.0)\d\d \[\d\.\d{3}-\d\.\d{3}\]",
                        rows["npy"]["epoch s (warm, median [95% CI])"])  # fmt: skip


def test_spread_and_coefficient_of_variation():
    assert spread([1.0, 1.04, 0.97]) == pytest.approx(0.04)
    # MLPerf Storage's 5%: each repeat within 5% of the reported result (the median)
    assert not spread_too_wide([1.0, 1.04, 0.97]) and spread_too_wide([1.0, 1.0, 1.06])
    assert not spread_too_wide([1.0, 1.06])  # median 1.03: each repeat within 3% of it
    assert coefficient_of_variation([1.0, 1.0]) == 0 and math.isnan(coefficient_of_variation([1]))


def test_repeats_to_separate_reaches_about_80_percent_power():
    rng = np.random.default_rng(4)
    # one standard deviation apart, spread estimated from many values: about 17 repeats
    n = repeats_to_separate(rng.normal(1.0, 0.05, 4000), rng.normal(1.05, 0.05, 4000))
    assert 14 <= n <= 20
    hits = sum(mann_whitney_p(rng.normal(1.0, 0.05, n), rng.normal(1.05, 0.05, n)) < 0.05
               for _ in range(200))  # fmt: skip
    assert 0.68 <= hits / 200 <= 0.92
    assert repeats_to_separate([1.0, 1.0], [1.0, 1.0]) is None
    assert repeats_to_separate([1.0], [2.0]) is None  # no spread measured


def test_a_model_at_chance_makes_no_accuracy_claim():
    times = {("d", fmt): [1.0, 1.01] for fmt in ("npy", "zarr", "files-jpeg")}
    accuracy = {key: [0.1, 0.12] for key in times}  # 10 classes: chance is 0.1
    text = " ".join(findings(_results(times, accuracy)))
    assert "the model did not learn in this experiment" in text
    assert "chance level of 0.100 (10 classes" in text
    assert "did not change what the model learnt" not in text


def test_lossless_formats_must_agree_exactly_at_equal_seeds():
    times = {("d", fmt): [1.0, 1.01] for fmt in ("npy", "zarr", "files-jpeg")}
    same = {("d", "npy"): [0.8, 0.82], ("d", "zarr"): [0.8, 0.82], ("d", "files-jpeg"): [0.7, 0.9]}
    text = " ".join(findings(_results(times, same)))
    assert "the 2 lossless formats reached exactly the same final accuracy" in text
    assert "lossy files-jpeg/uint8/sample/w0 and of lossless npy" in text
    drift = {**same, ("d", "zarr"): [0.8, 0.83]}
    text = " ".join(findings(_results(times, drift)))
    assert "lossless formats reached different final accuracies at equal seeds" in text
    assert "exactly the same" not in text


def test_the_summary_is_sorted_by_the_geometric_mean_of_ratios_to_the_fastest():
    rng = np.random.default_rng(5)
    medians = {("one", "npy"): 1.0, ("one", "zarr"): 1.5, ("one", "hdf5"): 1.2,
               ("two", "npy"): 10.0, ("two", "zarr"): 9.0, ("two", "hdf5"): 12.0}  # fmt: skip
    results = _results({k: rng.normal(m, 0.01 * m, 10) for k, m in medians.items()})
    table = summary_table(results)
    # mean time would put zarr first (5.25 s); ratios to each dataset's fastest put npy first
    # (sqrt(1 x 1.11) = 1.05x), then zarr (sqrt(1.5 x 1) = 1.22x), then hdf5 (1.26x)
    assert [row[0] for row in table.rows] == ["npy", "zarr", "hdf5"]
    assert table.rows[0][-1] == "1.05x"
    assert re.fullmatch(r"\*\*(0\.9|1\.0)\d\d \(1\.00x\)\*\*", table.rows[0][1])
    assert table.rows[1][2].startswith("**") and table.rows[1][2].endswith("(1.00x)**")
    for column in (1, 2):  # 1% noise, 10 repeats: nothing is tied with either leader
        assert [row[column].startswith("**") for row in table.rows].count(True) == 1
