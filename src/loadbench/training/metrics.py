"""Classification metrics: accuracy, per-class precision/recall/F1, confusion, per-epoch meters.

Everything returned is plain Python (floats, ints, lists, dicts) so it can go straight into the
JSON and CSV files written next to a run: "save the numbers first, plot later".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _labels(values: Any) -> np.ndarray:
    """Class indices from indices, one-hot rows or logits (2-D: argmax over dim 1)."""
    if hasattr(values, "detach"):  # a torch tensor: argmax on its own device, then copy only ints
        if values.ndim == 2:
            values = values.argmax(dim=1)
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 2:
        arr = arr.argmax(axis=1)
    return arr.reshape(-1).astype(np.int64)


def accuracy(logits_or_pred: Any, targets: Any) -> float:
    """Fraction of samples whose predicted class equals the target; NaN for no samples.

    Args:
        logits_or_pred: class indices (N,) or scores (N, C), as a torch tensor or array-like.
        targets: class indices (N,) or one-hot rows (N, C).
    """
    pred, true = _labels(logits_or_pred), _labels(targets)
    if pred.shape != true.shape:
        raise ValueError(f"accuracy: {pred.size} predictions but {true.size} targets")
    if true.size == 0:
        return math.nan
    return float(np.mean(pred == true))


def classification_report(y_true: Any, y_pred: Any, classes: list[str]) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix, JSON-ready.

    A class that is never predicted has precision 0, one that never occurs has recall 0 (sklearn's
    `zero_division=0`, without its warnings); every class in `classes` counts in the macro means,
    as in sklearn with `labels=` given. No samples give accuracy NaN and zeros elsewhere.

    Args:
        y_true: true class indices (or one-hot rows), in range(len(classes)).
        y_pred: predicted class indices (or logits: argmax over dim 1).
        classes: class names, index order.

    Returns:
        {"accuracy", "precision_macro", "recall_macro", "f1_macro": float,
         "per_class": {name: {"precision", "recall", "f1": float, "support": int}},
         "confusion_matrix": list of len(classes) rows (true class) of len(classes) ints
         (predicted class)}.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    true, pred = _labels(y_true), _labels(y_pred)
    n_classes = len(classes)
    if len(set(classes)) != n_classes:
        raise ValueError(f"classification_report: duplicate class names in {classes}")
    if true.shape != pred.shape:
        raise ValueError(f"classification_report: {true.size} targets but {pred.size} predictions")
    for name, values in (("y_true", true), ("y_pred", pred)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(
                f"classification_report: {name} has class indices outside 0..{n_classes - 1}"
            )
    if true.size == 0:  # an empty split: a report of zeros rather than a crash after training
        precision = recall = f1 = support = np.zeros(n_classes)
        matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    else:
        labels = list(range(n_classes))
        precision, recall, f1, support = precision_recall_fscore_support(
            true, pred, labels=labels, average=None, zero_division=0
        )
        matrix = confusion_matrix(true, pred, labels=labels)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "accuracy": float(np.mean(true == pred)) if true.size else math.nan,
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in matrix],
    }


class EpochMeter:
    """Mean loss and accuracy over the batches of one epoch, weighted by batch size.

    Keeps only Python numbers, never the tensors, so memory does not grow with the epoch; one
    device sync (the correct count) per batch.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._loss_sum = 0.0
        self._correct = 0
        self._count = 0

    def update(self, loss: float, logits: Any, targets: Any) -> None:
        """Add one batch.

        Args:
            loss: the batch's mean loss (a float, or a 0-d tensor).
            logits: scores (N, C), or predicted class indices (N,).
            targets: class indices (N,), or one-hot rows (N, C).
        """
        n = int(targets.shape[0])
        pred = logits.argmax(1) if logits.ndim == 2 else logits
        true = targets.argmax(1) if targets.ndim == 2 else targets
        self._correct += int((pred == true).sum())
        self._loss_sum += float(loss) * n
        self._count += n

    @property
    def loss(self) -> float:
        """Mean loss per sample so far; NaN before the first batch."""
        return self._loss_sum / self._count if self._count else math.nan

    @property
    def accuracy(self) -> float:
        """Fraction of samples classified correctly so far; NaN before the first batch."""
        return self._correct / self._count if self._count else math.nan

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count

    def totals(self) -> tuple[float, int, int]:
        """(loss sum, correct, count): what DDP ranks add up into one meter."""
        return self._loss_sum, self._correct, self._count

    @classmethod
    def from_totals(cls, loss_sum: float, correct: int, count: int) -> EpochMeter:
        meter = cls()
        meter._loss_sum, meter._correct, meter._count = float(loss_sum), int(correct), int(count)
        return meter
