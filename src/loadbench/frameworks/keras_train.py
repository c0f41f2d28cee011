"""`loadbench train --framework keras`: a `KerasRun` and the run directory a torch run leaves,
with `model.keras` for `model.pt`: config.yaml (the resolved config), history.csv, metrics.json
(per-split classification reports, timings, parameters), curves.png and confusion.png."""

from __future__ import annotations

import os
import time
from typing import Any

from loadbench import progress
from loadbench.errors import LoadbenchError, writable_folder
from loadbench.frameworks.keras_data import check_keras_store
from loadbench.frameworks.keras_models import keras_parameters
from loadbench.frameworks.keras_run import KerasRun, check_keras_config
from loadbench.store import Store
from loadbench.training.config import TrainConfig
from loadbench.training.loop import RunResult, open_run_data
from loadbench.training.metrics import classification_report
from loadbench.training.plots import plot_confusion, plot_curves
from loadbench.training.runfiles import write_json
from loadbench.training.train import default_out_dir, resolved_config, timings
from loadbench.util import write_text_atomic

MODEL_FILE = "model.keras"


def train_keras(config: TrainConfig, store: Store | None = None) -> RunResult:
    """Train as `config` says in Keras; writes the run directory `config.out` (or a new one)."""
    check_keras_config(config)  # before a run directory is made
    store = store if store is not None else open_run_data(config)
    check_keras_store(store, config)
    out = config.out or default_out_dir(config)
    if any(os.path.isfile(os.path.join(out, name)) for name in (MODEL_FILE, "checkpoint.pt")):
        raise LoadbenchError(f"{out} already holds a run; choose another --out")
    writable_folder(out, "writing the run to")
    with KerasRun(config, store, out_dir=out) as run:
        progress.console.print(f"[dim]{run.plan.note}; keras {run.graph} on {run.device}[/dim]")
        text = resolved_config(run).model_copy(update={"out": out, "graph": run.graph}).to_yaml()
        write_text_atomic(os.path.join(out, "config.yaml"), text)
        started = time.perf_counter()
        run.warm_up()
        sanity = run.initial_loss()
        if sanity["far_from_expected"]:
            progress.console.print(
                f"[yellow]warning:[/yellow] loss before training {sanity['initial_loss']:.3f} is "
                f"far from ln({len(run.classes)}) = {sanity['expected_ln_classes']:.3f}; check "
                "the labels, the normalisation and the last layer"
            )
        run.fit()
        metrics = finish(run, sanity, started)
    return RunResult(out, run.history, metrics, run.model)


def finish(run: KerasRun, sanity: dict[str, Any], started: float) -> dict[str, Any]:
    """The final evaluation of every held-out split, metrics.json, the plots and the model."""
    plan = run.plan
    evaluations = {plan.eval_split: (_report(run, run.eval_batches), len(plan.eval_indices))}
    if plan.test_split and plan.test_split != plan.eval_source:
        test = run.split_batches(plan.test_split)
        evaluations["test"] = (_report(run, test), run.store.counts[plan.test_split])
        test.close()
    total, trainable = keras_parameters(run.model)
    metrics: dict[str, Any] = {
        "eval_split": plan.eval_split,
        "eval_note": plan.note,
        "val_carved_ratio": plan.carved_ratio,
        **{split: report for split, (report, _) in evaluations.items()},
        "epochs_run": len(run.history),
        "best_epoch": None,
        **timings(run.history, started),
        "compile_time_s": run.compile_time_s,
        "parameters": {"total": total, "trainable": trainable},
        "images": {
            "train": len(plan.train_indices),
            **{split: n for split, (_, n) in evaluations.items()},
        },  # fmt: skip
        "sanity": sanity,
        "device": run.device,
        "framework": "keras",
        "graph": run.graph,
    }
    _write_outputs(run, metrics, list(evaluations))
    return metrics


def _report(run: KerasRun, batches) -> dict[str, Any]:
    loss, predicted, targets = run.predict(batches)
    return {"loss": loss, **classification_report(targets, predicted, run.classes)}


def _write_outputs(run: KerasRun, metrics: dict[str, Any], splits: list[str]) -> None:
    out = run.out_dir
    run.save(os.path.join(out, MODEL_FILE))
    write_json(os.path.join(out, "metrics.json"), metrics)
    plot_curves(run.history, os.path.join(out, "curves.png"), smooth=run.config.smooth,
                title=f"{run.config.model} (keras {run.graph}) on {run.store.path}",
                evaluated=run.evaluated)  # fmt: skip
    for split in splits:
        name = "confusion.png" if split == run.plan.eval_split else f"confusion-{split}.png"
        report = metrics[split]
        plot_confusion(report["confusion_matrix"], run.classes, os.path.join(out, name),
                       title=f"{split}: accuracy {report['accuracy']:.3f}")  # fmt: skip
