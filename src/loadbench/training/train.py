"""`loadbench train`: one run, k folds, or a resumed run, and everything it leaves in RUN_DIR.

RUN_DIR holds `config.yaml` (the resolved config), `history.csv` (one row per epoch),
`metrics.json`, `curves.png`, `confusion.png`, `model.pt` (weights + what is needed to use them),
and `checkpoint.pt` (+ `best.pt` with early stopping) to resume from.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import statistics
import time
from typing import Any

import numpy as np

from loadbench import progress
from loadbench.errors import LoadbenchError, OutOfSpaceError, writable_folder
from loadbench.store import Store
from loadbench.training import checkpoint as ckpt
from loadbench.training.batches import make_batches
from loadbench.training.config import TrainConfig, load_config
from loadbench.training.distributed import is_main_process, model_digest
from loadbench.training.loop import Run, RunResult, open_run_data
from loadbench.training.metrics import classification_report
from loadbench.training.models import count_parameters
from loadbench.training.order import EpochOrder
from loadbench.training.plots import plot_confusion, plot_curves
from loadbench.training.runfiles import write_json
from loadbench.training.splits import SplitPlan, labels_of
from loadbench.util import write_text_atomic


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
    made = writable_folder(out, "writing the run to") if is_main_process() else False
    store = store if store is not None else open_run_data(config)
    with (
        _full_disk_kept_or_removed(out, made),
        Run(config, store, plan=plan, out_dir=out, callbacks=callbacks) as run,
    ):
        return _train(run, config, out, resume)


@contextlib.contextmanager
def _full_disk_kept_or_removed(out: str, made_here: bool):
    """A run that fills the disk leaves its directory only if there is a checkpoint in it to
    resume from (the error then says so); a directory this run made and nothing to resume is
    removed."""
    try:
        yield
    except OutOfSpaceError as e:
        if os.path.isfile(os.path.join(out, "checkpoint.pt")):
            e.args = (f"{e}; the run so far is kept: continue it with --resume {out}",)
        elif made_here:  # (made by the main process only)
            shutil.rmtree(out, ignore_errors=True)
        raise


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
    balanced = _balance_line(run)
    if balanced:
        progress.console.print(f"[dim]{balanced}[/dim]")
    if dist.is_main:
        os.makedirs(out, exist_ok=True)
        text = resolved_config(run).model_copy(update={"out": out}).to_yaml()
        write_text_atomic(os.path.join(out, "config.yaml"), text)
    started = time.perf_counter()
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
    metrics = finish(run, sanity, started)
    return RunResult(out, run.history, metrics, run.model)


def finish(run: Run, sanity: dict[str, Any], started: float | None = None) -> dict[str, Any]:
    """Final evaluation of every held-out split (per-class metrics, confusion) and every
    output file; `started`: when the run began (for its wall time)."""
    plan = run.plan
    evaluations = _evaluations(run)
    total, trainable = count_parameters(run.model.net)
    metrics: dict[str, Any] = {
        "eval_split": plan.eval_split,
        "eval_note": plan.note,
        "val_carved_ratio": plan.carved_ratio,
        **{split: report for split, (report, _) in evaluations.items()},
        "epochs_run": len(run.history),
        "best_epoch": run.best["epoch"] if run.config.early_stopping else None,
        **timings(run.history, started),
        "compile_time_s": run.compile_time_s,
        "parameters": {"total": total, "trainable": trainable},
        "images": {
            "train": len(plan.train_indices),
            **{split: n for split, (_, n) in evaluations.items()},
        },  # fmt: skip
        "epoch_class_counts": _epoch_class_counts(run),
        "sanity": sanity,
        "device": str(run.device),
    }
    if run.dist.active:
        metrics["distributed"] = _replicas(run)
    if run.dist.is_main:  # every rank holds the same metrics; rank 0 writes them
        _write_outputs(run, metrics, [split for split in evaluations])
    run.dist.barrier()  # no rank returns before the files are there
    return metrics


def _evaluations(run: Run) -> dict[str, tuple[dict[str, Any], int]]:
    """{split: (loss and classification report, images)}: the split evaluated each epoch, and
    the test split when it was held out apart."""
    plan = run.plan
    loss, predicted, targets = run.predict(run.eval_batches)
    out = {plan.eval_split: (_report(run, loss, predicted, targets), len(plan.eval_indices))}
    if plan.test_split and plan.test_split != plan.eval_source:
        test_loss, test_pred, test_true = run.predict(_plain_batches(run, plan.test_split))
        out["test"] = (_report(run, test_loss, test_pred, test_true), len(test_true))
    return out


def _report(run: Run, loss: float, predicted, targets) -> dict[str, Any]:
    return {"loss": loss, **classification_report(targets, predicted, run.classes)}


def timings(history: list[dict[str, Any]], started: float | None) -> dict[str, Any]:
    """Epoch times (training, and evaluation beside it) and the run's wall time."""
    times = [r["time_s"] for r in history]
    evals = [r["eval_time_s"] for r in history if r.get("eval_time_s") is not None]
    return {
        "epoch_time_s": {
            "first": times[0] if times else None,
            "mean": statistics.fmean(times) if times else None,
            "mean_after_first": statistics.fmean(times[1:]) if len(times) > 1 else None,
        },
        "eval_time_s": {"mean": statistics.fmean(evals) if evals else None},
        "total_train_time_s": sum(times),
        "wall_time_s": time.perf_counter() - started if started is not None else None,
    }


def _write_outputs(run: Run, metrics: dict[str, Any], splits: list[str]) -> None:
    """model.pt, metrics.json, curves.png and a confusion matrix plot per evaluated split
    (`confusion.png` for the split evaluated each epoch, `confusion-test.png` beside it)."""
    out, plan = run.out_dir, run.plan
    ckpt.save_model(os.path.join(out, "model.pt"), run.model, run.meta())
    write_json(os.path.join(out, "metrics.json"), metrics)
    plot_curves(run.history, os.path.join(out, "curves.png"), smooth=run.config.smooth,
                title=f"{run.config.model} on {run.store.path}",
                evaluated=run.evaluated)  # fmt: skip
    for split in splits:
        name = "confusion.png" if split == plan.eval_split else f"confusion-{split}.png"
        report = metrics[split]
        plot_confusion(report["confusion_matrix"], run.classes, os.path.join(out, name),
                       title=f"{split}: accuracy {report['accuracy']:.3f}")  # fmt: skip


def _epoch_class_counts(run: Run) -> dict[str, int]:
    """Images of each class in an epoch (the first), after `--balance`."""
    first = copy.copy(run.train_order)
    first.set_epoch(1)
    counts = first.class_counts(len(run.classes))
    return {name: int(n) for name, n in zip(run.classes, counts, strict=True)}


def _balance_line(run: Run) -> str | None:
    """What balancing does to an epoch, in one line (None without balancing)."""
    order = run.train_order
    if order.balance == "none":
        return None
    before = np.bincount(order.labels, minlength=len(run.classes))
    after = _epoch_class_counts(run)
    shown = ", ".join(f"{name} {n:,} (of {int(b):,})"
                      for (name, n), b in zip(after.items(), before, strict=True))  # fmt: skip
    return f"balance {order.balance}: {sum(after.values()):,} images per epoch: {shown}"


def resolved_config(run: Run) -> TrainConfig:
    """The run's config with the values it used where the config left them to defaults: the
    model's options, the optimizer's settings, normalisation, pinned memory, a carved val
    ratio. Written to config.yaml (and read back by --resume)."""
    from loadbench.training.models import resolve_model_options
    from loadbench.training.optim import optimizer_settings

    c = run.config
    model = {k: list(v) if isinstance(v, tuple) else v
             for k, v in resolve_model_options(c.model, c.model_options()).items()}  # fmt: skip
    update = {**model, **optimizer_settings(c), "normalize": run.normalized,
              "pin_memory": run.pinned}  # fmt: skip
    if run.plan.carved_ratio is not None:
        update["val_ratio"] = run.plan.carved_ratio
    return c.model_copy(update=update)


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

    store = store if store is not None else open_run_data(config)
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
    """The end of a run in one line: every evaluated split's accuracy and macro F1, epochs,
    epoch time with evaluation time beside it, and the wall time."""
    splits = [metrics["eval_split"]] + (["test"] if metrics["eval_split"] != "test"
                                         and "test" in metrics else [])  # fmt: skip
    parts = []
    for split in splits:
        part = metrics[split]
        if math.isnan(part["loss"]):
            parts.append(f"{split}: nothing evaluated")
        else:
            parts.append(f"{split} accuracy {part['accuracy']:.4f}, macro F1 "
                         f"{part['f1_macro']:.4f}, loss {part['loss']:.4f}")  # fmt: skip
    epoch, evaluation = metrics["epoch_time_s"], metrics.get("eval_time_s", {}).get("mean")
    timing = f"{metrics['epochs_run']} epochs, {epoch['mean']:.2f}s per epoch"
    if evaluation is not None:
        timing += f" + {evaluation:.2f}s evaluation"
    timing += f" (first {epoch['first']:.2f}s)"
    if metrics.get("wall_time_s") is not None:
        timing += f", wall time {metrics['wall_time_s']:.1f}s"
    if metrics["compile_time_s"]:
        timing += f", compile {metrics['compile_time_s']:.1f}s"
    return "; ".join(parts) + f"; {timing}"
