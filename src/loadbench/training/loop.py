"""The training run: data, model, optimizer and schedule in, history, metrics and files out.

Every epoch records what the benchmark needs besides loss and accuracy: wall time, time waiting
for the next batch (data stall), compute time and accelerator utilisation (compute over wall
time), timed without breaking the overlap of loading and computing (`timing.py`), images per
second and time to the first batch. Each epoch ends with an atomic checkpoint, so an
interrupted run resumes (`--resume RUN_DIR`) from its last finished epoch and gives the same
history as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.store import Store, open_data
from loadbench.training import checkpoint as ckpt
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.config import TrainConfig
from loadbench.training.distributed import Dist, gather_epoch, setup
from loadbench.training.metrics import EpochMeter
from loadbench.training.models import architecture_options
from loadbench.training.optim import current_lr, make_optimizer, make_schedule
from loadbench.training.order import EpochOrder
from loadbench.training.runfiles import json_able, restore, save_progress
from loadbench.training.sharding import Shard
from loadbench.training.splits import SplitPlan, channel_stats, labels_of, plan_splits
from loadbench.training.timing import DeviceTotals, StepClock


def open_run_data(config: TrainConfig) -> Store:
    """What a run trains on: a store, or a source with the run's source options and seed."""
    return open_data(config.data, cache_dir=config.cache_dir,
                     source_options=config.source_options(), seed=config.seed)  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoadbenchError(f"--device {name}: CUDA is not available here; use cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunResult:
    out_dir: str | None
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    model: torch.nn.Module = field(repr=False)


class Run:
    """One training run (one fold of k-fold is one run)."""

    def __init__(
        self,
        config: TrainConfig,
        store: Store | None = None,
        plan: SplitPlan | None = None,
        out_dir: str | None = None,
        callbacks: tuple[Callable[[dict[str, Any]], None], ...] = (),
        epoch_extras: Callable[[], dict[str, Any]] | None = None,
    ):
        """`callbacks` get each epoch's record, on every rank; `epoch_extras` (every rank, at
        each epoch's end) adds fields to it and, under DDP, to the rank's entry of `ranks`."""
        self.config = c = config
        self.store = store if store is not None else open_run_data(c)
        self.dist: Dist = setup(resolve_device(c.device))  # torchrun's process group, if any
        self.device = self.dist.place(resolve_device(c.device))
        self.out_dir = out_dir if out_dir is not None else c.out
        self.callbacks, self.epoch_extras = callbacks, epoch_extras
        seed_everything(c.seed)
        selects = c.early_stopping is not None  # the best epoch is chosen on the evaluation
        self.plan = plan or plan_splits(self.store, c.eval_split, c.val_ratio, c.seed, selects)
        self.train_labels = labels_of(self.store, "train")[self.plan.train_indices]
        self.eval_labels = labels_of(self.store, self.plan.eval_source)[self.plan.eval_indices]
        self.classes = self.store.classes
        self.model = self._build_model()
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.optimizer = make_optimizer(self.model, c)
        self.train_batches, self.eval_batches = self._batches()
        self.schedule = make_schedule(self.optimizer, c, len(self.train_batches))
        self.use_amp = c.amp
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=c.amp and self.device.type == "cuda")
        self.history: list[dict[str, Any]] = []
        self.best = {"loss": math.inf, "epoch": 0, "bad_epochs": 0}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.compile_time_s = 0.0
        # Under DDP, `forward` is the DistributedDataParallel wrapper (its construction
        # broadcasts rank 0's weights) and `model` the module saved; evaluation runs the module
        # itself, since ranks evaluate shards of different sizes and DDP's forward may sync.
        self.ddp = self.dist.wrap(self.model)
        self.forward = self.ddp or self.model
        self.eval_forward = self.model if self.ddp else self.forward

    def restore(self, out_dir: str) -> int:
        """Continue from the checkpoint in `out_dir`: the epoch to go on with."""
        return restore(self, out_dir)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def close(self) -> None:
        """Stop the DataLoader workers of this run's batches (see `data.shutdown`)."""
        shutdown(self.train_batches)
        shutdown(self.eval_batches)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- set-up ------------------------------------------------------------------------------
    def _build_model(self) -> ckpt.Classifier:
        from loadbench.training.models import create_model

        c = self.config
        h, w, channels = self.store.image_shape
        self.input_shape = (channels, h, w)
        net = create_model(c.model, self.input_shape, len(self.classes), **c.model_options())
        normalize = c.normalize if c.normalize is not None else c.model != "cnn-tiny"
        self.normalized = normalize
        if normalize:  # statistics of the training images only (document 003)
            mean, std = channel_stats(self.store, "train", self.plan.train_indices)
        else:  # document 004's minimal net takes the image scaled to [0, 1] as it is
            mean, std = [0.0] * channels, [1.0] * channels
        self.mean, self.std = mean, std
        return ckpt.Classifier(net, mean, std).to(self.device)

    def _batches(self):
        c = self.config
        names = list(c.augment)
        augment = build_augment(names, self.store.image_shape)
        copy_augment = None
        if c.balance == "oversample":  # copies of minority images are flipped and rotated
            copy_augment = build_augment(
                sorted(set(names) | {"flip", "rotate"}), self.store.image_shape
            )
        augmenter = Augmenter(augment, copy_augment, c.seed) if augment or copy_augment else None
        pin = c.pin_memory if c.pin_memory is not None else self.device.type == "cuda"
        self.pinned = pin and c.access != "device"
        common = {
            "access": c.access, "batch_size": c.batch_size, "workers": c.workers,
            "pin_memory": pin and c.access != "device", "device": self.device,
        }  # fmt: skip
        self.store.chunk_cache_bytes = c.chunk_cache_mb << 20
        self.train_order = EpochOrder(
            self.plan.train_indices, self.train_labels, c.seed, shuffle=c.shuffle,
            balance=c.balance, block=self.store.raw("train").block_images,
            window=c.shuffle_window,
        )  # fmt: skip
        eval_order = EpochOrder(self.plan.eval_indices, self.eval_labels, c.seed, shuffle=False)
        train = make_batches(self.store, "train", self.train_order, augmenter=augmenter,
                             shard=self.shard(), **common)  # fmt: skip
        evaluate = make_batches(
            self.store, self.plan.eval_source, eval_order, augmenter=None,
            shard=self.shard(even=False), **common,
        )  # fmt: skip
        return train, evaluate

    def shard(self, even: bool = True) -> Shard | None:
        """This rank's part of a split under DDP (even: as many samples on every rank, for
        training; else an exact partition, for evaluation); None in a single process."""
        return Shard(self.dist.rank, self.dist.world, even) if self.dist.active else None

    def meta(self) -> dict[str, Any]:
        """What a model file needs to be used again (see checkpoint.save_model)."""
        return {
            "model": self.config.model,
            "model_options": json_able(
                architecture_options(
                    self.config.model, self.input_shape, self.config.model_options()
                )
            ),  # fmt: skip
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    # -- steps -------------------------------------------------------------------------------
    def _to_device(self, images, labels):
        blocking = self.device.type != "cuda"
        return (
            images.to(self.device, non_blocking=not blocking),
            labels.to(self.device, non_blocking=not blocking),
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_mode(self) -> None:
        """Train mode, except batch norm layers that are frozen (a frozen pretrained backbone):
        they keep the statistics they were trained with, as Keras freezes a base model."""
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()

    def train_step(self, images, labels) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward(images)
            loss = self.loss_fn(logits.float(), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logits.detach(), loss.detach()

    def train_epoch(self, epoch: int, batches=None) -> dict[str, Any]:
        """One epoch over the training batches (or `batches`: compute-only runs give one
        device-resident batch again and again), timed as `timing` says (see `StepClock`)."""
        self.train_mode()
        self.train_order.set_epoch(epoch)
        torch.manual_seed(self.config.seed * 7919 + epoch)  # dropout: same per epoch on resume
        batches = self.train_batches if batches is None else batches
        clock = StepClock(self.device, self.config.timing)
        totals = DeviceTotals(self.device)
        first_batch = None
        steps = len(batches)
        started = time.perf_counter()
        with progress.task(f"epoch {epoch}", steps) as advance:
            iterator = iter(batches)
            for i in range(steps + 1):
                t0 = time.perf_counter()
                try:
                    images, labels = next(iterator)
                except StopIteration:
                    break
                images, labels = self._to_device(images, labels)
                clock.waited(time.perf_counter() - t0)
                if first_batch is None:
                    first_batch = time.perf_counter() - started
                with clock.step():
                    logits, loss = self.train_step(images, labels)
                    self.schedule.after_batch(epoch - 1, i, steps)
                    totals.add(loss, logits, labels)
                advance(1)
        clock.finish()  # the epoch's one synchronisation (overlap timing)
        elapsed = time.perf_counter() - started
        self.dist.broadcast_buffers(self.model)  # every rank evaluates and saves one model
        meter = totals.meter()
        overall = self._all_ranks(meter)
        compute = clock.compute_s()
        return {
            "time_s": elapsed,
            "train_loss": overall.loss,
            "train_accuracy": overall.accuracy,
            "data_wait_s": clock.data_wait_s,
            "compute_s": compute,
            "au": min(1.0, compute / elapsed) if elapsed > 0 else None,
            "timing": clock.timing,
            "images_per_s": meter.count / elapsed if elapsed > 0 else 0.0,
            "first_batch_s": first_batch or 0.0,
            "images": meter.count,
        }

    def _all_ranks(self, meter: EpochMeter) -> EpochMeter:
        """The meter of every rank's batches together (this rank's in a single process)."""
        if not self.dist.active:
            return meter
        return EpochMeter.from_totals(*self.dist.sum(meter.totals()))

    @torch.no_grad()
    def predict(self, batches) -> tuple[float, np.ndarray, np.ndarray]:
        """(mean loss, predicted classes, targets) over an iterable of batches.

        Under DDP, `batches` are this rank's shard (`shard(even=False)`) and the result is every
        rank's together, in rank order (the split's order), the same on every rank.
        """
        self.model.eval()
        meter = EpochMeter()
        predictions, targets = [], []
        for images, labels in batches:
            images, labels = self._to_device(images, labels)
            with self.autocast():
                logits = self.eval_forward(images)
            meter.update(float(self.loss_fn(logits.float(), labels)), logits, labels)
            predictions.append(logits.argmax(1).cpu())
            targets.append(labels.cpu())
        if self.dist.active:
            return self._gather_predictions(meter, predictions, targets)
        if not predictions:
            return math.nan, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return meter.loss, torch.cat(predictions).numpy(), torch.cat(targets).numpy()

    def _gather_predictions(self, meter: EpochMeter, predictions: list, targets: list):
        empty = np.zeros(0, dtype=np.int64)
        mine = (
            meter.totals(),
            torch.cat(predictions).numpy() if predictions else empty,
            torch.cat(targets).numpy() if targets else empty,
        )
        parts = self.dist.all_gather_object(mine)
        totals = (sum(column) for column in zip(*(p[0] for p in parts), strict=True))
        overall = EpochMeter.from_totals(*totals)
        predicted = np.concatenate([p[1] for p in parts])
        true = np.concatenate([p[2] for p in parts])
        return (overall.loss if overall.count else math.nan), predicted, true

    @property
    def evaluated(self) -> str:
        """The name of the split evaluated each epoch, as records and files call it."""
        return self.plan.eval_split or "val"

    def evaluate(self) -> dict[str, Any]:
        return evaluation(self.evaluated, self.predict, self.eval_batches)

    # -- sanity checks (document 003's recipe) -----------------------------------------------
    @torch.no_grad()
    def initial_loss(self) -> dict[str, Any]:
        """Loss on the first batch before any update, against ln(C) for a fresh classifier."""
        self.model.eval()
        self.train_order.set_epoch(0)
        images, labels = self._to_device(*next(iter(self.train_batches)))
        loss = float(self.loss_fn(self.eval_forward(images).float(), labels))
        expected = math.log(len(self.classes))
        far = abs(loss - expected) > max(0.5, 0.25 * expected)
        return {"initial_loss": loss, "expected_ln_classes": expected, "far_from_expected": far}

    def overfit_batch(self, max_steps: int = 500) -> dict[str, Any]:
        """Train on one batch until it is learnt: a model that cannot do this has a bug."""
        if self.dist.active:  # each rank would stop at its own batch, and DDP's steps would hang
            raise LoadbenchError("--overfit-batch checks one batch in a single process: run it "
                                 "without torchrun")  # fmt: skip
        self.train_mode()
        self.train_order.set_epoch(0)
        images, labels = self._to_device(*next(iter(self.train_batches)))
        accuracy, loss, steps = 0.0, math.inf, 0
        while steps < max_steps and not (accuracy == 1.0 and loss < 0.05):
            logits, loss_t = self.train_step(images, labels)
            steps += 1
            loss = float(loss_t)
            accuracy = float((logits.argmax(1) == labels).float().mean())
        return {
            "batch_size": len(labels), "steps": steps, "accuracy": accuracy, "loss": loss,
            "learnt": accuracy == 1.0,
        }  # fmt: skip

    # -- the loop ------------------------------------------------------------------------------
    def maybe_compile(self) -> None:
        """torch.compile the model; the compile time is measured apart from the epochs."""
        if not self.config.compile:
            return
        self.forward = torch.compile(self.ddp or self.model)
        self.eval_forward = torch.compile(self.model) if self.ddp else self.forward
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        started = time.perf_counter()
        self.train_order.set_epoch(0)
        images, labels = self._to_device(*next(iter(self.train_batches)))
        self.model.train()
        with self.autocast():
            self.loss_fn(self.forward(images).float(), labels).backward()
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.eval_forward(images)
        self._sync()
        self.compile_time_s = time.perf_counter() - started
        self.optimizer.zero_grad(set_to_none=True)
        self.model.load_state_dict(state)  # the warm-up must not change batch-norm statistics

    def fit(self, start_epoch: int = 1) -> None:
        c = self.config
        for epoch in range(start_epoch, c.epochs + 1):
            lr = current_lr(self.optimizer)
            record = {"epoch": epoch, "lr": lr, **self.train_epoch(epoch), **self.evaluate()}
            extras = self.epoch_extras() if self.epoch_extras is not None else {}
            record = gather_epoch(self.dist, record, extras)  # + `ranks` under DDP
            self.schedule.after_epoch()
            self.history.append(record)
            stop = self._early_stopping(record)
            save_progress(self)
            for callback in self.callbacks:
                callback(record)
            progress.console.print(_epoch_line(record, c.epochs, self.evaluated), highlight=False)
            if stop:
                progress.console.print(
                    f"early stopping: no val-loss improvement for {c.early_stopping} epochs; "
                    f"restoring epoch {self.best['epoch']}"
                )
                break
        if c.early_stopping and self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def _early_stopping(self, record: dict[str, Any]) -> bool:
        loss = record[f"{self.evaluated}_loss"]
        if self.config.early_stopping is None:
            return False
        if loss < self.best["loss"]:
            self.best = {"loss": loss, "epoch": record["epoch"], "bad_epochs": 0}
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return False
        self.best["bad_epochs"] += 1
        return self.best["bad_epochs"] >= self.config.early_stopping


def evaluation(split: str, predict, batches) -> dict[str, Any]:
    """An epoch's evaluation fields: `predict(batches)`'s loss and accuracy on `split`, timed."""
    started = time.perf_counter()
    loss, predicted, targets = predict(batches)
    accuracy = float(np.mean(predicted == targets)) if len(targets) else math.nan
    return {
        f"{split}_loss": loss,
        f"{split}_accuracy": accuracy,
        "eval_time_s": time.perf_counter() - started,
    }


def _epoch_line(r: dict[str, Any], epochs: int, evaluated: str) -> str:
    return (
        f"epoch {r['epoch']}/{epochs}  {r['time_s']:.2f}s (+{r['eval_time_s']:.2f}s eval)  "
        f"lr {r['lr']:.3g}  "
        f"train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.3f}  "
        f"{evaluated} loss {r[f'{evaluated}_loss']:.4f} acc {r[f'{evaluated}_accuracy']:.3f}  "
        f"data wait {r['data_wait_s']:.2f}s  AU {r['au'] or 0:.0%}  {r['images_per_s']:,.0f} img/s"
        + (f"  ({len(r['ranks'])} ranks, slowest/median {r['straggler_ratio']:.2f}x)"
           if r.get("straggler_ratio") else "")
    )  # fmt: skip
