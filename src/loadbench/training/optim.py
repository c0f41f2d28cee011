"""Optimizers and learning-rate schedules (document 003: SGD, momentum, Nesterov, RMSprop, Adam;
step decay, cyclical LR, SGDR warm restarts; and fastai's one-cycle).

Schedules differ in when they step: step/multistep once per epoch, the others once per batch.
`Schedule` hides that: the loop calls `after_batch(epoch, i, n)` and `after_epoch()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loadbench.errors import LoadbenchError
from loadbench.training.config import TrainConfig

DEFAULT_LR = {"sgd": 0.01, "rmsprop": 0.001, "adam": 0.001, "adamw": 0.001}

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda params, c, lr: torch.optim.SGD(
        params, lr=lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
        weight_decay=c.weight_decay,
    ),
    "rmsprop": lambda params, c, lr: torch.optim.RMSprop(
        params, lr=lr, momentum=c.momentum if c.momentum else 0.0, weight_decay=c.weight_decay
    ),
    "adam": lambda params, c, lr: torch.optim.Adam(params, lr=lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c, lr: torch.optim.AdamW(
        params, lr=lr, weight_decay=c.weight_decay or 0.01
    ),
}  # fmt: skip


def base_lr(config: TrainConfig) -> float:
    return config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.nesterov and config.optimizer != "sgd":
        raise LoadbenchError(f"--nesterov is for sgd, not {config.optimizer}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LoadbenchError("the model has no trainable parameters (is everything frozen?)")
    return OPTIMIZERS[config.optimizer](params, config, base_lr(config))


class Schedule:
    """A torch LR scheduler and the rhythm it steps in."""

    def __init__(self, scheduler, per_batch: bool, fractional: bool = False):
        self.scheduler = scheduler
        self.per_batch = per_batch
        self.fractional = fractional  # SGDR takes the fractional epoch

    def after_batch(self, epoch: int, batch: int, batches: int) -> None:
        if self.scheduler is None or not self.per_batch:
            return
        if self.fractional:
            self.scheduler.step(epoch + (batch + 1) / batches)
        else:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state)


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, batches_per_epoch: int
) -> Schedule:
    """The schedule of `config.schedule` for a run of `config.epochs` epochs."""
    s = torch.optim.lr_scheduler
    epochs, lr = config.epochs, base_lr(config)
    name = config.schedule
    if name == "none":
        return Schedule(None, per_batch=False)
    if name == "step":
        size = config.step_size or max(1, epochs // 3)
        return Schedule(s.StepLR(optimizer, step_size=size, gamma=config.gamma), per_batch=False)
    if name == "multistep":
        # Document 003's example: 50 epochs at 0.1, 25 at 0.01, 25 at 0.001 = milestones 50, 75.
        milestones = config.milestones or [max(1, epochs // 2), max(2, epochs * 3 // 4)]
        scheduler = s.MultiStepLR(optimizer, milestones=list(milestones), gamma=config.gamma)
        return Schedule(scheduler, per_batch=False)
    steps = max(1, batches_per_epoch)
    if name == "cyclic":
        # Triangular cycles between lr and max_lr (Smith 2017), `cycle_epochs` per full cycle.
        up = max(1, round(config.cycle_epochs * steps / 2))
        scheduler = s.CyclicLR(
            optimizer, base_lr=lr, max_lr=config.max_lr or 4 * lr, step_size_up=up,
            cycle_momentum=False,
        )  # fmt: skip
        return Schedule(scheduler, per_batch=True)
    if name == "cosine-restarts":
        # SGDR: cosine decay that restarts every `restart_epochs` (times `restart_mult`).
        period = config.restart_epochs or max(1.0, epochs / 4)
        scheduler = s.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, round(period)), T_mult=config.restart_mult, eta_min=lr * 1e-3
        )
        return Schedule(scheduler, per_batch=True, fractional=True)
    if name == "onecycle":
        # fastai's fit_one_cycle: warm up for a quarter, then anneal; lr is the peak.
        scheduler = s.OneCycleLR(
            optimizer, max_lr=config.max_lr or lr, total_steps=epochs * steps, pct_start=0.25,
            div_factor=25.0, final_div_factor=1e5,
        )  # fmt: skip
        return Schedule(scheduler, per_batch=True)
    raise LoadbenchError(f"unknown schedule {name!r}")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
