"""`loadbench train`: one run, k folds, or a resumed run, and everything it leaves in RUN_DIR.

RUN_DIR holds `config.yaml` (the resolved config), `history.csv` (one row per epoch),
`metrics.json`, `curves.png`, `confusion.png`, `model.pt` (weights + what is needed to use them),
and `checkpoint.pt` (+ `best.pt` with early stopping) to resume from.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import numpy as np

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.store import Store, open_data
from loadbench.training import checkpoint as ckpt
from loadbench.training.batches import make_batches
from loadbench.training.config import TrainConfig, load_config
from loadbench.training.distributed import is_main_process, model_digest
from loadbench.training.loop import Run, RunResult, write_json
from loadbench.training.metrics import classification_report
from loadbench.training.models import count_parameters
from loadbench.training.order import EpochOrder
from loadbench.training.plots import plot_confusion, plot_curves
from loadbench.training.splits import SplitPlan, labels_of


def default_out_dir(config: TrainConfig) -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{config.model}")


def train(
    config: TrainConfig,
    store: Store | None = None,
    *,
    resume: bool = False,
    callbacks=(),
    plan: SplitPlan | None = None,
) -> RunResult:
    """Train as `config` says; with `resume`, continue the run in `config.out`."""
    if config.kfold and plan is None:
        return train_kfold(config, store)
    out = config.out or default_out_dir(config)
    if not resume and os.path.isfile(os.path.join(out, "checkpoint.pt")):
        raise LoadbenchError(
            f"{out} already holds a run; continue it with --resume {out} or choose another --out"
        )
    store = store if store is not None else open_data(config.data, cache_dir=config.cache_dir)
    with Run(config, store, plan=plan, out_dir=out, callbacks=callbacks) as run:
        return _train(run, config, out, resume)


def _train(run: Run, config: TrainConfig, out: str, resume: bool) -> RunResult:
    dist = run.dist  # under torchrun: every rank trains, rank 0 prints and writes
    ranks = f"; {dist.world} processes ({dist.backend})" if dist.active else ""
    progress.console.print(f"[dim]{run.plan.note}; device {run.device}{ranks}[/dim]")
    start = run.restore(out) if resume else 1
    dist.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
    sanity = run.initial_loss()
    if start == 1 and sanity["far_from_expected"]:
        progress.console.print(
            f"[yellow]warning:[/yellow] loss before training {sanity['initial_loss']:.3f} is far "
            f"from ln({len(run.classes)}) = {sanity['expected_ln_classes']:.3f}; check the labels, "
            "the normalisation and the last layer"
        )
    if dist.is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config.model_copy(update={"out": out}).to_yaml())
    run.maybe_compile()
    try:
        run.fit(start)
    except KeyboardInterrupt:
        done = run.history[-1]["epoch"] if run.history else 0
        progress.console.print(
            f"[yellow]interrupted[/yellow] after epoch {done}; continue with "
            f"`loadbench train --resume {out}`"
        )
        raise
    metrics = finish(run, sanity)
    return RunResult(out, run.history, metrics, run.model)


def finish(run: Run, sanity: dict[str, Any]) -> dict[str, Any]:
    """Final evaluation (per-class metrics, confusion) and every output file."""
    out = run.out_dir
    plan = run.plan
    loss, predicted, targets = run.predict(run.eval_batches)
    evaluated = {"loss": loss, **classification_report(targets, predicted, run.classes)}
    times = [r["time_s"] for r in run.history]
    total, trainable = count_parameters(run.model.net)
    metrics: dict[str, Any] = {
        "eval_split": plan.eval_split,
        "eval_note": plan.note,
        plan.eval_split: evaluated,
        "epochs_run": len(run.history),
        "best_epoch": run.best["epoch"] if run.config.early_stopping else None,
        "epoch_time_s": {
            "first": times[0] if times else None,
            "mean": statistics.fmean(times) if times else None,
            "mean_after_first": statistics.fmean(times[1:]) if len(times) > 1 else None,
        },
        "total_train_time_s": sum(times),
        "compile_time_s": run.compile_time_s,
        "parameters": {"total": total, "trainable": trainable},
        "images": {"train": len(plan.train_indices), plan.eval_split: len(plan.eval_indices)},
        "sanity": sanity,
        "device": str(run.device),
    }
    if plan.test_split and plan.test_split != plan.eval_source:
        test_loss, test_pred, test_true = run.predict(_plain_batches(run, plan.test_split))
        metrics["test"] = {
            "loss": test_loss,
            **classification_report(test_true, test_pred, run.classes),
        }
        metrics["images"]["test"] = len(test_true)
    if run.dist.active:
        metrics["distributed"] = _replicas(run)
    if not run.dist.is_main:  # every rank holds the same metrics; rank 0 writes them
        run.dist.barrier()
        return metrics
    ckpt.save_model(os.path.join(out, "model.pt"), run.model, run.meta())
    write_json(os.path.join(out, "metrics.json"), metrics)
    held_out = "" if plan.eval_split == "val" else f" (val = the {plan.eval_split} split)"
    plot_curves(run.history, os.path.join(out, "curves.png"), smooth=run.config.smooth,
                title=f"{run.config.model} on {run.store.path}{held_out}")  # fmt: skip
    plot_confusion(
        evaluated["confusion_matrix"], run.classes, os.path.join(out, "confusion.png"),
        title=f"{plan.eval_split}: accuracy {evaluated['accuracy']:.3f}",
    )  # fmt: skip
    run.dist.barrier()  # no rank returns before the files are there
    return metrics


def _replicas(run: Run) -> dict[str, Any]:
    """The world, and a digest of every rank's final weights: DDP keeps replicas identical,
    and this records that it did."""
    digests = run.dist.all_gather_object(model_digest(run.model))
    identical = len(set(digests)) == 1
    if not identical:
        progress.console.print(
            "[yellow]warning:[/yellow] the ranks ended with different weights; model.pt holds "
            "rank 0's"
        )
    return {"world_size": run.dist.world, "backend": run.dist.backend,
            "model_sha256": digests, "identical": identical}  # fmt: skip


def _plain_batches(run: Run, split: str):
    labels = labels_of(run.store, split)
    order = EpochOrder(np.arange(len(labels)), labels, run.config.seed, shuffle=False)
    c = run.config
    return make_batches(
        run.store, split, order, access=c.access, batch_size=c.batch_size, workers=0,
        pin_memory=False, device=run.device, augmenter=None, shard=run.shard(even=False),
    )  # fmt: skip


def train_kfold(config: TrainConfig, store: Store | None = None) -> RunResult:
    """K stratified folds of the training split, one run each, and their mean +- std."""
    from sklearn.model_selection import StratifiedKFold

    store = store if store is not None else open_data(config.data, cache_dir=config.cache_dir)
    out = config.out or default_out_dir(config)
    labels = labels_of(store, "train")
    counts = np.bincount(labels)
    if counts[counts > 0].min() < config.kfold:
        raise LoadbenchError(f"--kfold {config.kfold}: a class has fewer images than folds")
    folds = StratifiedKFold(config.kfold, shuffle=True, random_state=config.seed)
    results = []
    for k, (train_idx, eval_idx) in enumerate(folds.split(np.zeros(len(labels)), labels), 1):
        note = f"fold {k}/{config.kfold}: {len(eval_idx)} of the training images held out"
        plan = SplitPlan("train", train_idx, "val", "train", eval_idx, None, note)
        fold_config = config.model_copy(
            update={"out": os.path.join(out, f"fold-{k}"), "kfold": None}
        )
        progress.console.print(f"[bold]fold {k}/{config.kfold}[/bold]")
        results.append(train(fold_config, store, plan=plan))
    summary = {"folds": config.kfold}
    for key in ("accuracy", "f1_macro", "loss"):
        values = [r.metrics["val"][key] for r in results]
        summary[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_fold": values,
        }
    if is_main_process():
        write_json(os.path.join(out, "kfold.json"), summary)
    return RunResult(out, [], {"kfold": summary}, results[-1].model)


def resume_config(run_dir: str, **overrides: Any) -> TrainConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise LoadbenchError(f"{run_dir} is not a training run: it has no config.yaml")
    config = load_config(path, **overrides)
    return config.model_copy(update={"out": run_dir})


def summary_line(metrics: dict[str, Any]) -> str:
    split = metrics["eval_split"]
    part = metrics[split]
    epoch = metrics["epoch_time_s"]
    return (
        f"{split} accuracy {part['accuracy']:.4f}, macro F1 {part['f1_macro']:.4f}, "
        f"loss {part['loss']:.4f}; {metrics['epochs_run']} epochs, "
        f"{epoch['mean']:.2f}s per epoch (first {epoch['first']:.2f}s)"
        + (f", compile {metrics['compile_time_s']:.1f}s" if metrics["compile_time_s"] else "")
        if not math.isnan(part["loss"])
        else f"{split}: nothing evaluated"
    )
