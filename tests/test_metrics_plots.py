"""Metrics against hand-computed numbers; every plot writes a real PNG, atomically."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loadbench.training.metrics import EpochMeter, accuracy, classification_report
from loadbench.training.plots import (
    _confusion_figure,
    _curves_figure,
    _lr_find_figure,
    plot_confusion,
    plot_curves,
    plot_lr_find,
    smooth_ema,
)

CLASSES = ["a", "b", "c"]
# "b" is never predicted (precision 0 by zero_division), "c" never occurs (support 0).
Y_TRUE = [0, 0, 0, 0, 1, 1]
Y_PRED = [0, 0, 0, 2, 0, 0]


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_png(path, directory):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert [p.name for p in directory.iterdir()] == [path.name]  # no temporary file left


# --- metrics ----------------------------------------------------------------------------------


def test_classification_report_hand_computed():
    report = classification_report(Y_TRUE, Y_PRED, CLASSES)
    assert report["accuracy"] == pytest.approx(0.5)
    a, b, c = (report["per_class"][name] for name in CLASSES)
    # a: 3 of 5 "a" predictions right, 3 of 4 true "a" found.
    assert a == pytest.approx({"precision": 0.6, "recall": 0.75, "f1": 2 / 3, "support": 4})
    assert b == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["precision_macro"] == pytest.approx(0.6 / 3)
    assert report["recall_macro"] == pytest.approx(0.75 / 3)
    assert report["f1_macro"] == pytest.approx(2 / 9)
    assert report["confusion_matrix"] == [[3, 0, 1], [2, 0, 0], [0, 0, 0]]
    assert list(report["per_class"]) == CLASSES
    json.dumps(report)  # plain Python all the way down
    assert type(report["accuracy"]) is float and type(a["support"]) is int


def test_classification_report_accepts_tensors_and_logits():
    logits = F.one_hot(torch.tensor(Y_PRED), 3).float() * 5.0
    report = classification_report(torch.tensor(Y_TRUE), logits, CLASSES)
    assert report == classification_report(Y_TRUE, Y_PRED, CLASSES)


def test_classification_report_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        classification_report([0, 3], [0, 1], CLASSES)


def test_classification_report_of_no_samples():
    empty = np.zeros(0, dtype=np.int64)
    report = classification_report(empty, empty, CLASSES)
    assert math.isnan(report["accuracy"]) and report["f1_macro"] == 0.0
    assert report["per_class"]["a"]["support"] == 0
    assert report["confusion_matrix"] == [[0, 0, 0]] * 3


def test_accuracy_of_predictions_and_logits():
    assert accuracy(np.array(Y_PRED), np.array(Y_TRUE)) == pytest.approx(0.5)
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert math.isnan(accuracy([], []))


def test_epoch_meter_equals_full_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(15, 4, generator=gen)
    targets = torch.randint(0, 4, (15,), generator=gen)
    meter = EpochMeter()
    assert meter.count == 0 and math.isnan(meter.loss) and math.isnan(meter.accuracy)
    start = 0
    for size in (7, 5, 3):  # uneven batches: the mean must be weighted by batch size
        batch = slice(start, start + size)
        loss = F.cross_entropy(logits[batch], targets[batch]).item()
        meter.update(loss, logits[batch], targets[batch])
        start += size
    assert meter.count == 15
    assert meter.loss == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert meter.accuracy == pytest.approx(accuracy(logits, targets))
    # Only Python numbers are kept, never the tensors.
    assert all(isinstance(v, int | float) for v in vars(meter).values())
    meter.reset()
    assert meter.count == 0


# --- smoothing --------------------------------------------------------------------------------


def test_smooth_ema():
    assert smooth_ema([2.0] * 6, 0.9) == pytest.approx([2.0] * 6)
    # avg: 0, 0.5, 1.25; bias correction 1 - 0.5^n: 0.5, 0.75, 0.875
    assert smooth_ema([0.0, 1.0, 2.0], 0.5) == pytest.approx([0.0, 2 / 3, 10 / 7])
    out = smooth_ema([0.0, math.nan, 1.0], 0.5)
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == pytest.approx(2 / 3)
    assert smooth_ema([1.0, 5.0], 0.0) == [1.0, 5.0]
    with pytest.raises(ValueError):
        smooth_ema([1.0], 1.0)


# --- plots ------------------------------------------------------------------------------------


def history(epochs=5, val=True):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.5 + 0.05 * e}
        if val:
            row |= {"val_loss": 2.5 / e, "val_accuracy": 0.4 + 0.05 * e}
        rows.append(row)
    return rows


def test_curves_fixed_axes():
    fig = _curves_figure(history(), smooth=0.6, title="run")
    ax_loss, ax_acc = fig.axes[:2]
    assert ax_acc.get_ylim() == (0.0, 1.0)
    assert ax_loss.get_ylim() == pytest.approx((0.0, 2.5 * 1.05))
    assert {t.get_text() for t in ax_loss.get_legend().get_texts()} == {"train", "val"}


GAPS = [  # validation only on some epochs: None, NaN and absent keys
    {**r, "val_loss": None if r["epoch"] % 2 else r["val_loss"]}
    | ({"val_accuracy": math.nan} if r["epoch"] == 3 else {})
    for r in history()
]
ALL_NAN = [{"epoch": 1, "train_loss": math.nan, "train_accuracy": math.nan}]


@pytest.mark.parametrize(
    ("rows", "smooth"),
    [
        (history(), 0.0),
        (pd.DataFrame(history()), 0.5),
        (history(val=False), 0.0),
        (pd.DataFrame(history(val=False)), 0.5),
        (GAPS, 0.5),
        (ALL_NAN, 0.5),
    ],
    ids=["list", "dataframe-smooth", "no-val", "no-val-dataframe-smooth", "gaps", "all-nan"],
)
def test_plot_curves_writes_png(tmp_path, rows, smooth):
    path = plot_curves(rows, tmp_path / "curves.png", smooth=smooth)
    assert_png(path, tmp_path)
    ax_loss, ax_acc = _curves_figure(rows, smooth).axes[:2]
    assert ax_loss.get_ylim()[0] == 0 and ax_acc.get_ylim() == (0.0, 1.0)


def test_curves_all_nan_loss_axis_is_unit():
    ax_loss = _curves_figure([{"epoch": 1, "train_loss": None}]).axes[0]
    assert ax_loss.get_ylim() == (0.0, 1.0)


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_with_empty_row(tmp_path, normalize):
    matrix = classification_report(Y_TRUE, Y_PRED, CLASSES)["confusion_matrix"]
    path = plot_confusion(matrix, CLASSES, tmp_path / "confusion.png", normalize=normalize)
    assert_png(path, tmp_path)
    texts = [t.get_text() for t in _confusion_figure(matrix, CLASSES, normalize).axes[0].texts]
    assert len(texts) == 9
    assert texts[:3] == (["0.75", "0.00", "0.25"] if normalize else ["3", "0", "1"])


def test_plot_confusion_many_classes(tmp_path):
    classes = [f"class{i}" for i in range(40)]
    matrix = np.random.default_rng(0).integers(0, 20, (40, 40))
    path = plot_confusion(matrix, classes, tmp_path / "sub" / "confusion.png")
    assert_png(path, tmp_path / "sub")
    ax = _confusion_figure(matrix, classes).axes[0]
    assert len(ax.texts) == 0 and len(ax.get_xticks()) == 0 and len(ax.images) == 1


def test_plot_confusion_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion([[1, 2], [3, 4]], CLASSES, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_lr_find(tmp_path):
    lrs = np.geomspace(1e-6, 1.0, 50)
    losses = 2.3 - np.linspace(0, 1, 50) + np.linspace(0, 1, 50) ** 8 * 5
    losses[10] = math.nan
    smoothed = smooth_ema(losses, 0.9)
    path = plot_lr_find(lrs, losses, tmp_path / "lr.png", suggestion=1e-3, smoothed=smoothed)
    assert_png(path, tmp_path)
    ax = _lr_find_figure(lrs, losses, 1e-3, smoothed).axes[0]
    assert ax.get_xscale() == "log"
    assert "suggested lr 1.00e-03" in [t.get_text() for t in ax.get_legend().get_texts()]
    (tmp_path / "lr.png").unlink()
    assert_png(plot_lr_find(lrs, losses, tmp_path / "lr.png"), tmp_path)
