"""A Keras run's input: each epoch a tf.data.Dataset of (float32 N,C,H,W in [0, 1], int64 N), the
tensors a torch run's model gets.

Two sources, so that the framework can be measured apart from the loader:

- a store whose reader has a TensorFlow pipeline of its own (`tf_dataset`: the `tf-data` peer):
  that pipeline over the TFRecord shards, as a TensorFlow user reads them, no torch in between.
  It streams in its own order (shard order and a shuffle buffer, seeded by seed and epoch);
- any loadbench format: loadbench's own loader, `make_batches` (the one a torch run iterates:
  the exact epoch order, the access mode, the workers, the augmentation) wrapped in
  `tf.data.Dataset.from_generator` with a fixed signature and `prefetch(AUTOTUNE)`, whose
  thread pulls the next batches while Keras runs a step.

Other peer loaders are other projects' torch pipelines, and are refused.
"""

from __future__ import annotations

import math

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.training.augment import Augmenter
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder
from loadbench.util import cpu_budget


class KerasBatches:
    """One split's batches for a Keras run: `dataset(epoch)` is the epoch's tf.data.Dataset,
    iterating this object gives the batches of the order's current epoch (evaluation)."""

    kind = ""  # "loadbench" or the peer's name, as records and lines say it
    own_order = False  # streams in its library's order, not the run's `EpochOrder`

    def __init__(self, tf, order: EpochOrder, steps: int):
        self.tf, self.order, self.steps = tf, order, steps

    def __len__(self) -> int:
        return self.steps

    def dataset(self, epoch: int):
        raise NotImplementedError

    def first_batch(self):
        """The first batch of epoch 0 (a warm-up's), as (images, labels)."""
        raise NotImplementedError

    @property
    def stages(self):
        """The loader's stage counters (`stages.StageWindow`), None for a pipeline without."""
        return None

    def close(self) -> None:
        """Stop the loader's workers, if it has any."""

    def __iter__(self):
        iterator = iter(self.dataset(self.order.epoch))
        while True:
            try:
                yield self.next_batch(iterator)
            except StopIteration:
                return

    def next_batch(self, iterator):
        """`next(iterator)`, with the loader's own error where TensorFlow raised one for it."""
        try:
            return next(iterator)
        except self.tf.errors.OpError as e:
            raise self.explain(e) from None

    def explain(self, error) -> BaseException:
        return error


class LoaderBatches(KerasBatches):
    """loadbench's loader (`make_batches`) in tf.data: from_generator, then prefetch."""

    kind = "loadbench"

    def __init__(self, tf, loader, order: EpochOrder, image_shape, threads: int):
        super().__init__(tf, order, len(loader))
        h, w, c = image_shape
        self.loader, self.threads = loader, threads
        self.signature = (tf.TensorSpec((None, c, h, w), tf.float32),
                          tf.TensorSpec((None,), tf.int64))  # fmt: skip
        self.error: BaseException | None = None  # what the loader raised in tf.data's thread

    def dataset(self, epoch: int):
        """The epoch's batches (one pass). Its first batch is taken here, in the caller's
        thread: a DataLoader starts its worker processes with its first batch, and workers
        forked from a thread of tf.data's pool were seen to exit with code 1 when stopped (3
        runs of 8 here; none of 6 since), which torch reports as a crashed worker."""
        tf = self.tf
        self.order.set_epoch(epoch)
        self.error = None
        batches = iter(self.loader)
        first = next(batches, None)
        dataset = tf.data.Dataset.from_generator(
            lambda: self._generate(first, batches), output_signature=self.signature
        )
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.threads
        options.threading.max_intra_op_parallelism = 1
        options.autotune.cpu_budget = self.threads
        return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)

    def _generate(self, first, batches):
        if first is None:  # an empty epoch
            return
        try:
            yield first[0].numpy(), first[1].numpy()
            for images, labels in batches:
                yield images.numpy(), labels.numpy()
        except Exception as e:  # tf.data hands on its text only: keep the error itself
            self.error = e
            raise

    def explain(self, error) -> BaseException:
        return self.error if self.error is not None else error

    def first_batch(self):
        self.order.set_epoch(0)
        images, labels = next(iter(self.loader))
        return images.numpy(), labels.numpy()

    @property
    def stages(self):
        return getattr(self.loader, "stages", None)

    def close(self) -> None:
        shutdown(self.loader)


class PipelineBatches(KerasBatches):
    """A store's own TensorFlow pipeline (`reader.tf_dataset`: the tf-data peer)."""

    own_order = True

    def __init__(self, tf, epochs, order: EpochOrder, steps: int, kind: str):
        super().__init__(tf, order, steps)
        self.epochs, self.kind = epochs, kind

    def dataset(self, epoch: int):
        return self.epochs(epoch)

    def first_batch(self):
        return self.next_batch(iter(self.dataset(0)))

    def explain(self, error) -> BaseException:
        return self.epochs.damaged(error) if isinstance(error, self.epochs.errors) else error


def has_own_pipeline(store) -> bool:
    """Whether the store's reader hands TensorFlow a pipeline of its own (`tf_dataset`)."""
    return own_pipeline(store.format)  # None for a source read into memory


def own_pipeline(fmt) -> bool:
    """Whether stores of format `fmt` hand TensorFlow a pipeline of their own (`tf_dataset`)."""
    return fmt is not None and hasattr(fmt.reader_class, "tf_dataset")


def check_keras_store(store, config) -> None:
    """LoadbenchError for a store or loading options a Keras run cannot read with (said before
    TensorFlow loads)."""
    check_keras_format(store.format, config)


def check_keras_format(fmt, config) -> None:
    """`check_keras_store` for a store of format `fmt` (a bench checks before converting)."""
    if own_pipeline(fmt):
        _check_own_pipeline(fmt, config)
    elif fmt is not None and (fmt.peer or fmt.own_order):
        raise LoadbenchError(
            f"{fmt.name} is another project's torch pipeline; --framework keras reads "
            "loadbench's formats (through loadbench's loader) or tf-data (tf.data's own "
            "pipeline): convert the data to one of those"
        )
    elif config.access == "device":
        raise LoadbenchError(
            "--access device keeps the split in torch's device memory; a Keras run reads host "
            "batches: use --access sample, batch or threads"
        )


def _check_own_pipeline(fmt, config) -> None:
    why = None
    if config.access not in fmt.accesses:
        why = f"runs its own pipeline with {'/'.join(fmt.accesses)} access only"
    elif config.augment:
        why = "hands tf.data's batches straight to Keras, and augmentation runs in torch"
    elif config.balance != "none" or config.shuffle == "block":
        why = "streams in its library's own order (shard order and a shuffle buffer)"
    if why is not None:
        raise LoadbenchError(
            f"{fmt.name} {why}: with --framework keras give it no --augment, --balance, "
            "--shuffle block or --access, or train from a loadbench format (e.g. tfrecord)"
        )


def keras_batches(tf, store, split: str, order: EpochOrder, *, access: str, batch_size: int,
                  workers: int, augmenter: Augmenter | None) -> KerasBatches:  # fmt: skip
    """A split's batches for Keras: the store's own TensorFlow pipeline when its reader has
    one, else loadbench's loader (`check_keras_store` first)."""
    if has_own_pipeline(store):
        reader = store.new_reader(split)
        epochs = reader.tf_dataset(order, batch_size=batch_size, workers=workers)
        steps = math.ceil(len(np.unique(order.indices)) / batch_size)
        return PipelineBatches(tf, epochs, order, steps, store.format.name)
    loader = make_batches(store, split, order, access=access, batch_size=batch_size,
                          workers=workers, pin_memory=False, device="cpu",
                          augmenter=augmenter)  # fmt: skip
    return LoaderBatches(tf, loader, order, store.image_shape, cpu_budget(workers))
