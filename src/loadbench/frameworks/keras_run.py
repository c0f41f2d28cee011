"""`KerasRun`: a training run in Keras 3 on TensorFlow, shaped as torch's `training.loop.Run`.

The same model (`keras_models.py`), loss (cross-entropy of logits), optimizer and schedule
(`keras_optim.py`), batch size, epochs, seed, splits and normalisation as a torch run of the
same config; the data come from the store's own tf.data pipeline or loadbench's loader
(`keras_data.py`). `graph` is how Keras runs a step: `eager` (`run_eagerly=True`), `compiled`
(a tf.function graph, without XLA: Keras' own default, jit_compile="auto", would turn XLA on
where TensorFlow has a GPU) or `xla` (`jit_compile=True`).

The loop is torch's: a Python loop over the epoch's batches, `next(iterator)` timed as the data
wait, `model.train_on_batch` as the step. `train_on_batch` hands the step's loss back as a Python
number, which waits for the step to finish, so every step is synchronised: the records say
`timing: sync`. Tracing and compiling are timed apart (`warm_up`, the run's `compile_time_s`),
on every batch shape an epoch will see, so no epoch pays for them.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.frameworks.keras_data import KerasBatches, check_keras_store, keras_batches
from loadbench.frameworks.keras_models import check_keras_model, create_keras_model
from loadbench.frameworks.keras_optim import check_keras_optim, keras_optimizer
from loadbench.frameworks.tf_runtime import configure, import_keras
from loadbench.store import Store
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.config import GRAPHS, TrainConfig, resolved_graph
from loadbench.training.loop import evaluation, open_run_data
from loadbench.training.metrics import EpochMeter
from loadbench.training.order import EpochOrder
from loadbench.training.splits import SplitPlan, channel_stats, labels_of, plan_splits

# Inter-op threads: two, so that tf.data's hand-over of the next batch and a step's independent
# ops are not queued behind one another; torch has no such pool, and more threads would only
# compete with the loader's cores.
INTER_OP_THREADS = 2
ACCURACY = "accuracy"


def check_keras_config(config: TrainConfig) -> None:
    """LoadbenchError for what a Keras run does not do, said before TensorFlow loads."""
    check_keras_model(config.model)
    check_keras_optim(config)
    refused = (
        (config.amp, "--amp: torch's autocast has no exact Keras counterpart (Keras' mixed "
                     "precision is a dtype policy of the layers)"),
        (config.compile, "--compile is torch.compile; Keras compiles its steps by default "
                         "(--graph compiled), or with XLA (--graph xla)"),
        (config.early_stopping, "--early-stopping is torch's loop's"),
        (config.kfold, "--kfold runs torch folds"),
        (config.overfit_batch, "--overfit-batch checks a torch model"),
    )  # fmt: skip
    for given, why in refused:
        if given:
            raise LoadbenchError(f"{why}: leave it out with --framework keras")


class KerasRun:
    """One Keras training run: `warm_up()`, `fit()`, `predict(batches)`, `close()`, and the
    attributes `Run` has (`classes`, `plan`, `history`, `compile_time_s`, `train_batches`,
    `eval_batches`, `train_order`); `device` is where the model ran ("cpu", "cuda:N")."""

    framework = "keras"

    def __init__(
        self,
        config: TrainConfig,
        store: Store | None = None,
        *,
        graph: str | None = None,
        plan: SplitPlan | None = None,
        out_dir: str | None = None,
        callbacks: tuple[Callable[[dict[str, Any]], None], ...] = (),
        epoch_extras: Callable[[], dict[str, Any]] | None = None,
    ):
        """`graph`: eager|compiled|xla (default: the config's, else compiled); `callbacks`
        get each epoch's record, `epoch_extras` adds fields to it; with `out_dir`, history.csv
        is written there after every epoch."""
        import torch

        self.config = c = config
        self.graph = graph or resolved_graph(c)
        if self.graph not in GRAPHS:
            raise LoadbenchError(f"graph {self.graph!r}: choose one of {', '.join(GRAPHS)}")
        check_keras_config(c)
        self.store = store if store is not None else open_run_data(c)
        check_keras_store(self.store, c)
        self.out_dir = out_dir if out_dir is not None else c.out
        self.callbacks, self.epoch_extras = callbacks, epoch_extras
        self.tf, self.keras = import_keras()
        # Intra-op threads: the ones torch computes with in this process, so that both
        # frameworks compute on as many cores.
        self.device = configure(self.tf, c.device, intra_threads=torch.get_num_threads(),
                                inter_threads=INTER_OP_THREADS)  # fmt: skip
        self.keras.utils.set_random_seed(c.seed)
        self.plan = plan or plan_splits(self.store, c.eval_split, c.val_ratio, c.seed)
        self.classes = self.store.classes
        self.model = self._build_model()
        self.train_batches, self.eval_batches = self._batches()
        own_order = self.train_batches.own_order  # tf.data's shuffle buffer, not an order
        self.train_order: EpochOrder | None = None if own_order else self.train_batches.order
        try:
            self.optimizer = self._compile()
        except BaseException:
            self.close()
            raise
        self.history: list[dict[str, Any]] = []
        self.compile_time_s = 0.0
        self.sanity: dict[str, Any] | None = None
        self.pinned = False  # (as `Run` records it) batches go to Keras from pageable memory

    def close(self) -> None:
        """Stop the loaders' workers."""
        self.train_batches.close()
        self.eval_batches.close()

    def __enter__(self) -> KerasRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def evaluated(self) -> str:
        """The name of the split evaluated each epoch, as records and files call it."""
        return self.plan.eval_split or "val"

    # -- set-up ------------------------------------------------------------------------------
    def _batches(self) -> tuple[KerasBatches, KerasBatches]:
        c, store, plan = self.config, self.store, self.plan
        store.chunk_cache_bytes = c.chunk_cache_mb << 20
        order = EpochOrder(
            plan.train_indices, labels_of(store, "train")[plan.train_indices], c.seed,
            shuffle=c.shuffle, balance=c.balance, block=store.raw("train").block_images,
            window=c.shuffle_window,
        )  # fmt: skip
        eval_labels = labels_of(store, plan.eval_source)[plan.eval_indices]
        eval_order = EpochOrder(plan.eval_indices, eval_labels, c.seed, shuffle=False)
        common = {"access": c.access, "batch_size": c.batch_size, "workers": c.workers}
        train = keras_batches(self.tf, store, "train", order, augmenter=self._augmenter(),
                              **common)  # fmt: skip
        try:
            evaluate = keras_batches(self.tf, store, plan.eval_source, eval_order,
                                     augmenter=None, **common)  # fmt: skip
        except BaseException:
            train.close()
            raise
        return train, evaluate

    def split_batches(self, split: str) -> KerasBatches:
        """A whole split's batches in store order, from the source the run trains from (the
        test split's final evaluation)."""
        c = self.config
        labels = labels_of(self.store, split)
        order = EpochOrder(np.arange(len(labels)), labels, c.seed, shuffle=False)
        return keras_batches(self.tf, self.store, split, order, access=c.access,
                             batch_size=c.batch_size, workers=0, augmenter=None)  # fmt: skip

    def _augmenter(self) -> Augmenter | None:
        """Augmentation as torch's run does it (in the loader, seeded per sample)."""
        c, shape = self.config, self.store.image_shape
        names = list(c.augment)
        augment = build_augment(names, shape)
        copies = None
        if c.balance == "oversample":  # copies of minority images are flipped and rotated
            copies = build_augment(sorted(set(names) | {"flip", "rotate"}), shape)
        return Augmenter(augment, copies, c.seed) if augment or copies else None

    def _build_model(self):
        c = self.config
        h, w, channels = self.store.image_shape
        self.input_shape = (channels, h, w)
        normalize = c.normalize if c.normalize is not None else c.model != "cnn-tiny"
        self.normalized = normalize
        if normalize:  # statistics of the training images only, as torch's run
            self.mean, self.std = channel_stats(self.store, "train", self.plan.train_indices)
        else:
            self.mean, self.std = [0.0] * channels, [1.0] * channels
        stats = {"mean": self.mean, "std": self.std} if normalize else {}
        return create_keras_model(self.keras, c.model, self.input_shape, len(self.classes),
                                  **stats, **c.model_options())  # fmt: skip

    def _compile(self):
        keras = self.keras
        optimizer = keras_optimizer(keras, self.config, len(self.train_batches))
        self.model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name=ACCURACY)],
            run_eagerly=self.graph == "eager",
            jit_compile=self.graph == "xla",
        )
        if self.graph == "xla" and not self.model.jit_compile:
            raise LoadbenchError("Keras cannot XLA-compile this model here; use --graph compiled")
        optimizer.build(self.model.trainable_variables)  # its state exists before the warm-up
        return optimizer

    # -- steps -------------------------------------------------------------------------------
    def current_lr(self) -> float:
        """The lr of the next step (the optimizer's schedule at its step count)."""
        return float(np.asarray(self.optimizer.learning_rate))

    def warm_up(self) -> None:
        """Trace and compile every step an epoch runs (a training step on a full and on the
        last, shorter batch; an evaluation step on the evaluation's batch sizes) on the first
        batch, timed as `compile_time_s`; then the weights and the optimizer's state are put
        back, so the warm-up changes nothing. Eager runs compile nothing and take a few steps'
        time. The evaluation step comes first: its loss is the run's loss before training."""
        images, labels = self.train_batches.first_batch()
        state = [*self.model.variables, *self.optimizer.variables]
        saved = [np.array(v.numpy()) for v in state]
        batch = self.config.batch_size
        started = time.perf_counter()
        for n in _batch_sizes(len(self.plan.eval_indices), batch):
            logits = self.model.predict_on_batch(images[:n])
            if self.sanity is None:
                self.sanity = _initial_loss(logits, labels[:n], len(self.classes))
        for n in _batch_sizes(len(self.plan.train_indices), batch):
            self.model.train_on_batch(images[:n], labels[:n])
        self.compile_time_s = time.perf_counter() - started
        for variable, value in zip(state, saved, strict=True):
            variable.assign(value)

    maybe_compile = warm_up  # the name torch's `Run` gives its warm-up

    def initial_loss(self) -> dict[str, Any]:
        """Loss on the first batch before any update, against ln(C) (as torch's run)."""
        if self.sanity is None:
            images, labels = self.train_batches.first_batch()
            logits = self.model.predict_on_batch(images)
            self.sanity = _initial_loss(logits, labels, len(self.classes))
        return self.sanity

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch: data wait is the time in `next(iterator)` (and in making the epoch's
        pipeline), compute the time in `train_on_batch` (which returns after its step: see the
        module's docstring)."""
        totals = {"wait": 0.0, "compute": 0.0, "loss": 0.0, "correct": 0.0, "images": 0}
        first_batch = None
        batches = self.train_batches
        started = time.perf_counter()
        with progress.task(f"epoch {epoch}", len(batches)) as advance:
            # The epoch's pipeline (and, from loadbench's loader, its first batch): data wait.
            iterator = iter(batches.dataset(epoch))
            totals["wait"] += time.perf_counter() - started
            while True:
                t0 = time.perf_counter()
                try:
                    images, labels = batches.next_batch(iterator)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                totals["wait"] += t1 - t0
                first_batch = first_batch if first_batch is not None else t1 - started
                logs = self.model.train_on_batch(images, labels, return_dict=True)
                totals["compute"] += time.perf_counter() - t1
                n = int(labels.shape[0])
                totals["loss"] += logs["loss"] * n
                totals["correct"] += logs[ACCURACY] * n
                totals["images"] += n
                advance(1)
        return _epoch_record(totals, time.perf_counter() - started, first_batch)

    def predict(self, batches) -> tuple[float, np.ndarray, np.ndarray]:
        """(mean loss, predicted classes, targets) over an iterable of (images, labels)
        batches: this run's `eval_batches`, or any (torch's batches too)."""
        meter = EpochMeter()
        predictions, targets = [], []
        for images, labels in batches:
            logits = np.asarray(self.model.predict_on_batch(images))
            labels = np.asarray(labels, dtype=np.int64)
            meter.update(_cross_entropy(logits, labels), logits, labels)
            predictions.append(logits.argmax(1))
            targets.append(labels)
        if not predictions:
            return math.nan, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return meter.loss, np.concatenate(predictions), np.concatenate(targets)

    def evaluate(self) -> dict[str, Any]:
        return evaluation(self.evaluated, self.predict, self.eval_batches)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        """Every epoch: train, evaluate, record (+ `epoch_extras()`), call the callbacks."""
        from loadbench.training.runfiles import write_history

        epochs = self.config.epochs
        for epoch in range(1, epochs + 1):
            lr = self.current_lr()
            record = {"epoch": epoch, "lr": lr, **self.train_epoch(epoch), **self.evaluate()}
            if self.epoch_extras is not None:
                record.update(self.epoch_extras())
            self.history.append(record)
            if self.out_dir is not None:
                os.makedirs(self.out_dir, exist_ok=True)
                write_history(os.path.join(self.out_dir, "history.csv"), self.history,
                              self.evaluated)  # fmt: skip
            for callback in self.callbacks:
                callback(record)
            line = epoch_line(record, epochs, self.evaluated, self.graph)
            progress.console.print(line, highlight=False)

    def save(self, path: str) -> None:
        """The trained model as a `.keras` file, without the optimizer (a plain copy: any
        Keras 3 loads it with `keras.models.load_model`), written atomically."""
        plain = self.keras.Model.from_config(self.model.get_config())  # no compile config
        plain.set_weights(self.model.get_weights())
        folder = os.path.dirname(os.path.abspath(path))
        partial = os.path.join(folder, f".partial-{os.getpid()}.keras")
        try:
            with warnings.catch_warnings():  # Keras 3.15's saving, about TensorFlow's tensors
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                plain.save(partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)


def _batch_sizes(count: int, batch_size: int) -> list[int]:
    """The batch sizes an epoch over `count` images has: full batches and the last one."""
    sizes = [min(count, batch_size)]
    if count % batch_size and count > batch_size:
        sizes.append(count % batch_size)
    return [n for n in sizes if n > 0]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits (torch's CrossEntropyLoss), in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_sum - z[np.arange(len(labels)), labels]))


def _initial_loss(logits, labels, classes: int) -> dict[str, Any]:
    loss = _cross_entropy(np.asarray(logits), np.asarray(labels, dtype=np.int64))
    expected = math.log(classes)
    far = abs(loss - expected) > max(0.5, 0.25 * expected)
    return {"initial_loss": loss, "expected_ln_classes": expected, "far_from_expected": far}


def _epoch_record(totals: dict[str, Any], elapsed: float, first_batch: float | None):
    """An epoch's record, with the keys of torch's (`Run.train_epoch`)."""
    count = totals["images"]
    return {
        "time_s": elapsed,
        "train_loss": totals["loss"] / count if count else math.nan,
        "train_accuracy": round(totals["correct"]) / count if count else math.nan,
        "data_wait_s": totals["wait"],
        "compute_s": totals["compute"],
        "au": min(1.0, totals["compute"] / elapsed) if elapsed > 0 else None,
        "timing": "sync",
        "images_per_s": count / elapsed if elapsed > 0 else 0.0,
        "first_batch_s": first_batch or 0.0,
        "images": count,
    }


def epoch_line(r: dict[str, Any], epochs: int, evaluated: str, graph: str) -> str:
    """An epoch in one line, as torch's run prints it, with the framework and graph."""
    return (
        f"epoch {r['epoch']}/{epochs}  keras {graph}  {r['time_s']:.2f}s "
        f"(+{r['eval_time_s']:.2f}s eval)  lr {r['lr']:.3g}  "
        f"train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.3f}  "
        f"{evaluated} loss {r[f'{evaluated}_loss']:.4f} acc {r[f'{evaluated}_accuracy']:.3f}  "
        f"data wait {r['data_wait_s']:.2f}s  AU {r['au'] or 0:.0%}  "
        f"{r['images_per_s']:,.0f} img/s"
    )
