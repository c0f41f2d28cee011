"""Optimizers and learning-rate schedules (document 003: SGD, momentum, Nesterov, RMSprop, Adam;
step decay, cyclical LR, SGDR warm restarts; and fastai's one-cycle).

Schedules differ in when they step: step/multistep once per epoch, the others once per batch.
`Schedule` hides that: the loop calls `after_batch(epoch, i, n)` and `after_epoch()`.
"""

from __future__ import annotations

from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.options import Option, as_list

# Learning rates default to Keras's, the framework of documents 002-004 (PyTorch's differ for
# sgd, 0.001, and rmsprop, 0.01); momentum and weight decay default to what both frameworks use.
DEFAULT_LR = {"sgd": 0.01, "rmsprop": 0.001, "adam": 0.001, "adamw": 0.001}
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "rmsprop": 0.0, "adam": 0.0, "adamw": 0.01}
WITH_MOMENTUM = ("sgd", "rmsprop")
SCHEDULES = ("none", "step", "multistep", "cyclic", "cosine-restarts", "onecycle")


def _epochs(value: Any) -> list[int]:
    try:
        return [int(v) for v in as_list(value)]
    except (TypeError, ValueError):
        raise ValueError("must be comma-separated epochs, e.g. 50,75") from None


OPTIMIZER_OPTIONS = {
    "optimizer": Option("adam", "optimizer", choices=tuple(DEFAULT_LR)),
    "lr": Option(
        None, "learning rate", kind=float, above=0, shown="sgd 0.01, others 0.001, as Keras"
    ),
    "momentum": Option(
        None,
        "sgd/rmsprop momentum",
        kind=float,
        minimum=0,
        below=1,
        shown="0, as PyTorch and Keras",
    ),
    "nesterov": Option(False, "sgd with momentum: Nesterov momentum", kind=bool),
    "weight_decay": Option(
        None, "L2 weight decay", kind=float, minimum=0, shown="0; adamw 0.01, as PyTorch"
    ),
}
SCHEDULE_OPTIONS = {
    "schedule": Option("none", "learning-rate schedule", choices=SCHEDULES),
    "step_size": Option(None, "step: epochs between decays", kind=int, above=0, shown="epochs/3"),
    "gamma": Option(0.1, "step/multistep: decay factor", kind=float, above=0, maximum=1),
    "milestones": Option(
        None, "multistep: epochs, e.g. 50,75", parse=_epochs, shown="epochs/2, 3/4 of epochs"
    ),
    "max_lr": Option(
        None, "cyclic/onecycle: the peak lr", kind=float, above=0, shown="cyclic 4x lr; onecycle lr"
    ),
    "cycle_epochs": Option(4.0, "cyclic: epochs per full cycle", kind=float, above=0),
    "restart_epochs": Option(
        None, "cosine-restarts: first period in epochs", kind=float, above=0, shown="epochs/4"
    ),
    "restart_mult": Option(1, "cosine-restarts: period growth factor", kind=int, minimum=1),
}


# torch.optim's class of each optimizer.
OPTIMIZER_CLASSES = {"sgd": "SGD", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW"}


def base_lr(config) -> float:
    return config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]


def optimizer_settings(config) -> dict[str, Any]:
    """The optimizer's settings with every default resolved: lr, weight decay, and for sgd and
    rmsprop momentum (sgd: and nesterov). Combinations the optimizer cannot run are errors."""
    name = config.optimizer
    if config.momentum is not None and name not in WITH_MOMENTUM:
        raise LoadbenchError(
            f"--momentum is for sgd and rmsprop; {name} has no momentum (its betas are fixed)"
        )
    momentum = config.momentum or 0.0
    if config.nesterov and (name != "sgd" or momentum <= 0):
        raise LoadbenchError(
            f"--nesterov needs sgd with a momentum above 0 (got {name}, momentum {momentum}); "
            "e.g. --optimizer sgd --momentum 0.9 --nesterov"
        )
    decay = DEFAULT_WEIGHT_DECAY[name] if config.weight_decay is None else config.weight_decay
    settings: dict[str, Any] = {"lr": base_lr(config), "weight_decay": decay}
    if name in WITH_MOMENTUM:
        settings["momentum"] = momentum
    if name == "sgd":
        settings["nesterov"] = bool(config.nesterov)
    return settings


def make_optimizer(model, config):
    """The optimizer `config` names, over the model's trainable parameters."""
    settings = optimizer_settings(config)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LoadbenchError("the model has no trainable parameters (is everything frozen?)")
    import torch

    return getattr(torch.optim, OPTIMIZER_CLASSES[config.optimizer])(params, **settings)


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


def make_schedule(optimizer, config, batches_per_epoch: int) -> Schedule:
    """The schedule of `config.schedule` for a run of `config.epochs` epochs."""
    import torch

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


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
