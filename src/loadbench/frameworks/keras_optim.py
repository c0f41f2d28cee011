"""A config's optimizer and learning-rate schedule in Keras, where Keras computes what torch does.

`training/optim.py` resolves the settings (defaults, checks); this maps them onto Keras and
refuses, before TensorFlow loads, what Keras would compute differently:

- adam: Keras' Adam with torch's epsilon (1e-8). The one difference left is where epsilon
  sits: torch adds it to sqrt(v / (1 - beta2^t)), Keras to sqrt(v) (the Adam paper's "epsilon
  hat"), which only matters while sqrt(v) is near epsilon.
- adamw: the same, with decoupled weight decay in both (p -= lr * wd * p before the step).
- sgd: plain, momentum or Nesterov. With a constant lr Keras' velocity (lr folded in) is
  torch's buffer times -lr, so the steps are torch's; under a changing lr they are not, so
  momentum goes with `--schedule none` only. Weight decay: torch's is L2 coupled to the
  gradient, Keras' decoupled; without momentum the two are the same step, with it not.
- torch's weight decay of adam (L2 in the gradient) and rmsprop (Keras adds epsilon under the
  square root, torch after it) have no Keras equivalent: refused.

Schedules are functions of the step (`optimizer.iterations`), as torch's step: the epoch's
schedules (step, multistep) change at an epoch's first step, the per-batch ones (cyclic,
cosine-restarts) every step, each with torch's formula. onecycle is refused: torch's OneCycleLR
cycles Adam's beta1 (SGD's momentum) too, which no Keras schedule can.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.training.optim import base_lr, optimizer_settings

KERAS_SCHEDULES = ("none", "step", "multistep", "cyclic", "cosine-restarts")
TORCH_ADAM_EPSILON = 1e-8


def check_keras_optim(config) -> dict[str, Any]:
    """The optimizer's settings (`optim.optimizer_settings`) when Keras computes them as torch
    does; else a LoadbenchError that says why and what to use."""
    settings = optimizer_settings(config)
    name, decay = config.optimizer, settings["weight_decay"]
    momentum = settings.get("momentum", 0.0)
    if name == "rmsprop":
        raise LoadbenchError(
            "--optimizer rmsprop: Keras' RMSprop adds epsilon under the square root, torch's "
            "after it, so they differ; with --framework keras use adam, adamw or sgd"
        )
    if name == "adam" and decay:
        raise LoadbenchError(
            "--optimizer adam --weight-decay: torch's Adam adds the decay to the gradient (L2), "
            "Keras' decouples it; use --optimizer adamw (decoupled in both) with --framework keras"
        )
    if name == "sgd" and decay and momentum:
        raise LoadbenchError(
            "--optimizer sgd with --momentum and --weight-decay: torch's decay is L2 in the "
            "gradient, so it goes through the momentum, and Keras' does not; leave one out, or "
            "use adamw, with --framework keras"
        )
    if momentum and config.schedule != "none":
        raise LoadbenchError(
            f"sgd momentum with --schedule {config.schedule}: Keras keeps the lr inside the "
            "momentum and torch outside it, which differ once the lr changes; use --schedule "
            "none, or adam/adamw, with --framework keras"
        )
    if config.schedule not in KERAS_SCHEDULES:
        raise LoadbenchError(
            f"--schedule {config.schedule}: torch's OneCycleLR cycles the momentum (Adam's "
            f"beta1) with the lr, which a Keras schedule cannot; --framework keras takes "
            f"{', '.join(KERAS_SCHEDULES)}"
        )
    return settings


def keras_optimizer(keras, config, steps_per_epoch: int):
    """The Keras optimizer of `config`, its lr scheduled per step as torch's is."""
    settings = check_keras_optim(config)
    lr = keras_schedule(keras, config, steps_per_epoch)
    o = keras.optimizers
    if config.optimizer == "adam":
        return o.Adam(lr, epsilon=TORCH_ADAM_EPSILON)
    if config.optimizer == "adamw":
        return o.AdamW(lr, weight_decay=settings["weight_decay"], epsilon=TORCH_ADAM_EPSILON)
    return o.SGD(lr, momentum=settings["momentum"], nesterov=settings["nesterov"],
                 weight_decay=settings["weight_decay"] or None)  # fmt: skip


def keras_schedule(keras, config, steps_per_epoch: int):
    """The lr, or a schedule of the step, as `optim.make_schedule` sets torch's."""
    name, lr, epochs = config.schedule, base_lr(config), config.epochs
    steps = max(1, steps_per_epoch)
    if name == "none":
        return lr
    if name in ("step", "multistep"):
        if name == "step":
            size = config.step_size or max(1, epochs // 3)
            milestones = list(range(size, epochs + 1, size))
        else:
            milestones = config.milestones or [max(1, epochs // 2), max(2, epochs * 3 // 4)]
        return _epoch_decay(keras, lr, config.gamma, milestones, steps)
    if name == "cyclic":
        up = max(1, round(config.cycle_epochs * steps / 2))
        return _triangular(keras)(lr, config.max_lr or 4 * lr, up)
    # cosine-restarts: torch steps SGDR with the fractional epoch, which is step / steps.
    period = config.restart_epochs or max(1.0, epochs / 4)
    return keras.optimizers.schedules.CosineDecayRestarts(
        lr, first_decay_steps=max(1, round(period)) * steps, t_mul=float(config.restart_mult),
        m_mul=1.0, alpha=1e-3,
    )  # fmt: skip


def _epoch_decay(keras, lr: float, gamma: float, milestones, steps: int):
    """lr x gamma per milestone passed: torch's StepLR/MultiStepLR, stepped after each epoch,
    give epoch e (from 0) the factor gamma^(milestones <= e); that epoch starts at step e x
    steps, and PiecewiseConstantDecay changes after a boundary, so the boundary is one less."""
    counts = sorted(Counter(int(m) for m in milestones).items())
    if not counts:  # no decay within the run
        return lr
    values, factor = [lr], 1.0
    for _, times in counts:
        factor *= gamma**times
        values.append(lr * factor)
    boundaries = [m * steps - 1 for m, _ in counts]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


_TRIANGULAR: dict[int, type] = {}


def _triangular(keras) -> type:
    """torch's CyclicLR(mode="triangular") as a Keras schedule class (made once Keras is in)."""
    if _TRIANGULAR:
        return _TRIANGULAR[0]
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="loadbench")
    class Triangular(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, base: float, peak: float, up: int):
            self.base, self.peak, self.up = float(base), float(peak), int(up)

        def __call__(self, step):
            x = ops.cast(step, "float32")
            cycle = ops.floor(1.0 + x / (2.0 * self.up))
            distance = ops.abs(x / self.up - 2.0 * cycle + 1.0)
            return self.base + (self.peak - self.base) * ops.maximum(0.0, 1.0 - distance)

        def get_config(self) -> dict[str, Any]:
            return {"base": self.base, "peak": self.peak, "up": self.up}

    _TRIANGULAR[0] = Triangular
    return Triangular
