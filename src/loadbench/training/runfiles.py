"""What a training run writes in its directory as it goes, and reads back to resume: history.csv
(one row per epoch), checkpoint.pt and best.pt, and JSON."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import torch

from loadbench.errors import LoadbenchError
from loadbench.training import checkpoint as ckpt
from loadbench.util import atomic_file, write_text_atomic


def history_columns(evaluated: str = "val") -> tuple[str, ...]:
    """history.csv's columns; `evaluated` names the split evaluated each epoch (val, or test
    when the store has no val split and nothing is chosen on it)."""
    return (
        "epoch", "time_s", "lr", "train_loss", "train_accuracy", f"{evaluated}_loss",
        f"{evaluated}_accuracy", "data_wait_s", "compute_s", "au", "eval_time_s", "images_per_s",
        "first_batch_s",
    )  # fmt: skip


HISTORY_COLUMNS = history_columns()


def save_progress(run) -> None:
    """history.csv, checkpoint.pt (and best.pt with early stopping) after an epoch: what
    `--resume` continues from. Under DDP rank 0 writes."""
    if run.out_dir is None or not run.dist.is_main:
        return
    os.makedirs(run.out_dir, exist_ok=True)
    write_history(os.path.join(run.out_dir, "history.csv"), run.history, run.evaluated)
    if run.best_state is not None:
        ckpt.save_atomic(run.best_state, os.path.join(run.out_dir, "best.pt"))
    state = {
        "epoch": run.history[-1]["epoch"],
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict(),
        "history": run.history,
        "best": run.best,
        "world_size": run.dist.world,
    }
    ckpt.save_atomic(state, os.path.join(run.out_dir, "checkpoint.pt"))


def restore(run, out_dir: str) -> int:
    """Load the last checkpoint of `out_dir` into `run`; returns the epoch to continue from."""
    state = ckpt.load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))
    _check_world_size(out_dir, int(state.get("world_size", 1)), run.dist.world)
    if run.config.schedule == "onecycle":
        planned = state["schedule"].get("total_steps")
        if planned != run.schedule.scheduler.total_steps:
            raise LoadbenchError(
                "a one-cycle schedule is planned for the run's length and cannot be "
                "extended; resume with the original --epochs or start a new run"
            )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    run.history = list(state["history"])
    run.best = dict(state["best"])
    best_file = os.path.join(out_dir, "best.pt")
    if os.path.isfile(best_file):
        run.best_state = torch.load(best_file, map_location=run.device, weights_only=True)
    return int(state["epoch"]) + 1


def _check_world_size(out_dir: str, saved: int, world: int) -> None:
    """A run resumes with the world size it was trained with: each rank's shard, and so the
    steps per epoch and the schedule, depend on it."""
    if saved == world:
        return
    how = (
        f"resume it under torchrun with {saved} processes (e.g. `torchrun --nproc-per-node "
        f"{saved} -m loadbench train --resume {out_dir}`)"
        if saved > 1
        else f"resume it without torchrun (`loadbench train --resume {out_dir}`)"
    )
    raise LoadbenchError(
        f"{out_dir} was trained with world size {saved} and this run has world size {world}; "
        f"{how}, or start a new run"
    )


def write_history(path: str, history: list[dict[str, Any]], evaluated: str = "val") -> None:
    with atomic_file(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=history_columns(evaluated), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def json_able(value: Any) -> Any:
    """Tuples as lists, all the way down (what JSON, YAML and torch.save keep alike)."""
    if isinstance(value, dict):
        return {k: json_able(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_able(v) for v in value]
    return value


def write_json(path: str, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=float))
