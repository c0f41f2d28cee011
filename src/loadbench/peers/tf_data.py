"""`tf-data`: the `tfrecord` format's shards read by TensorFlow's own input pipeline,
`tf.data.TFRecordDataset`, built as TensorFlow's guide "Better performance with the tf.data API"
recommends (https://www.tensorflow.org/guide/data_performance):

- the shard files, in an order shuffled every epoch, read one after the other by
  `TFRecordDataset(files)`: the guide's parallel `interleave` ("Parallelizing data extraction",
  aimed at remote storage) read local files slower;
- `shuffle(buffer, seed)` over the serialized records, before they are decoded: the small
  elements in the buffer ("Reducing memory footprint");
- `batch` before `map` ("Vectorizing mapping"): one `tf.io.parse_example` per batch, then
  `tf.io.decode_raw` (or `decode_png` / `decode_jpeg` per image) and the conversion to float32
  N,C,H,W in [0, 1], in a `map(num_parallel_calls=AUTOTUNE)` ("Parallelizing data
  transformation");
- `prefetch(tf.data.AUTOTUNE)` ("Prefetching").

tf.data runs in the main process on its own threads, capped to the run's CPU budget with
`tf.data.Options().threading` (https://www.tensorflow.org/api_docs/python/tf/data/ThreadingOptions)
and `autotune.cpu_budget`. Batches reach torch through DLPack (`torch.from_dlpack`), without a
copy. Random access (`read_items`, `labels`, `verify`) has no tf.data counterpart: it reads the
same shards through loadbench's record index, as the `tfrecord` format does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import types

import numpy as np

from loadbench.formats.base import Option, register_format
from loadbench.formats.records import SHARD_OPTION, RecordFormat, encoding_options
from loadbench.formats.tfrecord import TfRecordReader, TfRecordWriter
from loadbench.peers._base import PeerFormat, cpu_budget, epoch_seed, refuse_balance, subset

# The features `TfRecordWriter` stores that a reader needs (it writes more: format, size).
IMAGE, LABEL = "image/encoded", "image/class/label"

# What TensorFlow prints on stderr while it is imported (absl's notice that logging is not
# initialized, oneDNN's note, the CPU-instructions note): TF_CPP_MIN_LOG_LEVEL does not silence
# the first two in TensorFlow 2.21, because they are written before TensorFlow reads it.
_BANNER = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cpu_feature_guard|To enable the following "
    r"instructions|rebuild TensorFlow with the appropriate compiler flags"
)

# The `tfrecord` package, which the `tfrecord` format writes and checks records with, ships its
# own copy of TensorFlow's Example protos (`tfrecord.example_pb2`, registered as "example.proto"
# with the same message names). protobuf refuses a second copy, so whichever of the two modules
# a process imports second fails ("duplicate symbol 'tensorflow.BytesList'"; an open upstream
# fix: https://github.com/vahidk/tfrecord/pull/103). The second one is therefore given the
# messages of the first: the same messages, field for field, so the same records.
_MESSAGES = ("BytesList", "FloatList", "Int64List", "Feature", "Features", "FeatureList",
             "FeatureLists", "Example", "SequenceExample")  # fmt: skip
_TF_PROTOS = ("tensorflow.core.example.feature_pb2", "tensorflow.core.example.example_pb2")
_TFRECORD_PROTOS = "tfrecord.example_pb2"


def _messages_module(name: str, *sources) -> types.ModuleType:
    module = types.ModuleType(name)
    for source in sources:
        for message in _MESSAGES:
            if hasattr(source, message):
                setattr(module, message, getattr(source, message))
    return module


@contextlib.contextmanager
def _without_banner():
    """stderr (the file descriptor: TensorFlow's C++ logging writes there) kept while TensorFlow
    is imported, then written out without TensorFlow's banner lines."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            kept.seek(0)
            lines = kept.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _BANNER.search(line)))


def _import_tensorflow():
    """TensorFlow, imported quietly, beside the `tfrecord` package's protos, GPU hidden."""
    # INFO logs off (TFRecordDataset's buffer size, the CPU-instructions note); warnings kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    first = "tensorflow" not in sys.modules
    if first and importlib.util.find_spec("triton") is not None:
        # Triton (torch._dynamo imports it: torch.optim, torchvision) segfaults when it is
        # loaded after TensorFlow, in either's shared libraries; loaded before, both work.
        import triton  # noqa: F401
    own = sys.modules.get(_TFRECORD_PROTOS)
    if first and own is not None:  # the tfrecord package came first: TensorFlow uses its messages
        for name in _TF_PROTOS:
            sys.modules.setdefault(name, _messages_module(name, own))
    with _without_banner() if first else contextlib.nullcontext():
        import tensorflow as tf

    if _TFRECORD_PROTOS not in sys.modules:  # the tfrecord package, if it comes, uses TF's
        from tensorflow.core.example import example_pb2, feature_pb2

        sys.modules[_TFRECORD_PROTOS] = _messages_module(_TFRECORD_PROTOS, feature_pb2, example_pb2)
    return tf


def _configure(tf, threads: int) -> None:
    """TensorFlow on the CPU only (torch owns the GPU), with its process-wide pools (which
    tf.data does not use; its own threads are capped per pipeline) no larger than the budget.
    Both can be set only before TensorFlow's runtime starts: the first loader of a process
    (every benchmark run is a process of its own) sets them, later ones keep them."""
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)


class _Decode:
    """The vectorized map: a batch of (position in the epoch's stream, serialized Example) ->
    (float32 N,C,H,W in [0, 1], int64 labels, int64 store indices)."""

    def __init__(self, tf, encoding: str, image_shape: tuple[int, int, int], index_of):
        self.tf, self.encoding, self.shape = tf, encoding, tuple(image_shape)
        self.index_of = tf.constant(index_of)  # position -> store index
        self.features = {IMAGE: tf.io.FixedLenFeature([], tf.string),
                         LABEL: tf.io.FixedLenFeature([], tf.int64)}  # fmt: skip

    def __call__(self, positions, records):
        tf = self.tf
        parsed = tf.io.parse_example(records, self.features)
        data = parsed[IMAGE]
        if self.encoding == "raw":
            images = tf.reshape(tf.io.decode_raw(data, tf.uint8), (-1, *self.shape))
        else:  # PNG and JPEG decode one image at a time
            spec = tf.TensorSpec(self.shape, tf.uint8)
            images = tf.map_fn(self._decode_one, data, fn_output_signature=spec)
        # Converted here, on tf.data's threads, rather than in torch on the consumer's: 2.1x the
        # images/s on 32x32 raw images (65k vs 31k with 2 threads).
        images = tf.transpose(tf.cast(images, tf.float32) / 255.0, (0, 3, 1, 2))
        return images, parsed[LABEL], tf.gather(self.index_of, positions)

    def _decode_one(self, data):
        io, channels = self.tf.io, self.shape[2]
        if self.encoding == "png":
            image = io.decode_png(data, channels=channels)
        else:  # TensorFlow's default, INTEGER_FAST, is off by up to 6 levels from the pixels
            # the store holds (libjpeg-turbo's accurate DCT, as torchvision decodes).
            image = io.decode_jpeg(data, channels=channels, dct_method="INTEGER_ACCURATE")
        return self.tf.ensure_shape(image, self.shape)


class _Keep:
    """`filter` predicate: the record at this position of the stream is one of the epoch's."""

    def __init__(self, tf, kept: np.ndarray):
        self.tf, self.kept = tf, tf.constant(kept)

    def __call__(self, position, record):
        return self.tf.gather(self.kept, position)


class _Pipeline:
    """The tf.data pipeline of one epoch, its shuffles seeded from (seed, epoch)."""

    def __init__(self, tf, paths, counts, *, image_shape, encoding, keep, shuffle, buffer,
                 batch_size, threads):  # fmt: skip
        self.tf, self.paths, self.counts = tf, list(paths), np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.image_shape, self.encoding = image_shape, encoding
        self.keep = None
        if keep is not None:  # a mask over store indices
            self.keep = np.zeros(int(self.counts.sum()), dtype=bool)
            self.keep[keep] = True
        self.shuffle, self.buffer = shuffle, buffer
        self.batch_size, self.threads = batch_size, threads

    def __call__(self, seed: int):
        tf = self.tf
        do_not_convert = tf.autograph.experimental.do_not_convert  # plain TF ops, no Python flow
        shards = np.arange(len(self.paths))
        if self.shuffle:
            shards = np.random.default_rng(seed).permutation(len(self.paths))
        # Records are in index order within a shard (they hold no index of their own), so the
        # store index of each position of this epoch's stream follows from the shard order.
        index_of = np.concatenate(
            [np.arange(self.starts[k], self.starts[k] + self.counts[k]) for k in shards]
        )
        # One file after the other: the guide's parallel `interleave` (for remote storage) read
        # these local files slower, 64k vs 81k images/s (32x32 raw, 2 threads).
        records = tf.data.TFRecordDataset([self.paths[k] for k in shards]).enumerate()
        if self.keep is not None:  # before decoding: the samples left out cost a read only
            records = records.filter(do_not_convert(_Keep(tf, self.keep[index_of])))
        if self.shuffle:
            # A new pipeline every epoch, seeded from (seed, epoch), so no reshuffle on re-reads.
            records = records.shuffle(self.buffer, seed=seed, reshuffle_each_iteration=False)
        decode = _Decode(tf, self.encoding, self.image_shape, index_of)
        batches = records.batch(self.batch_size).map(
            do_not_convert(decode), num_parallel_calls=tf.data.AUTOTUNE
        )
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.threads
        options.threading.max_intra_op_parallelism = 1
        options.autotune.cpu_budget = self.threads
        return batches.prefetch(tf.data.AUTOTUNE).with_options(options)


class TfDataBatches:
    """The loader: each pass iterates that epoch's tf.data pipeline and hands its batches to
    torch without a copy; augmentation runs in torch, seeded by (seed, epoch, store index)."""

    def __init__(self, tf, pipeline, order, *, batch_size, augmenter, pin_memory, damaged):
        self.tf, self.pipeline, self.order = tf, pipeline, order
        self.batch_size, self.augmenter, self.pin_memory = batch_size, augmenter, pin_memory
        self.damaged = damaged  # tf.data's error -> the damaged-store error
        self._running = None

    def __len__(self) -> int:
        return math.ceil(len(np.unique(self.order.indices)) / self.batch_size)

    def __iter__(self):
        self.close()
        epoch = self.order.epoch
        dataset = self.pipeline(epoch_seed(self.order.seed, epoch))
        self._running = self._batches(iter(dataset), epoch)
        return self._running

    def _batches(self, iterator, epoch: int):
        import torch

        errors = (self.tf.errors.DataLossError, self.tf.errors.InvalidArgumentError)
        while True:
            try:
                images, labels, indices = next(iterator)
            except StopIteration:
                return
            except errors as e:  # a damaged record, or one not as TfRecordWriter writes them
                raise self.damaged(e) from None
            images, labels = torch.from_dlpack(images), torch.from_dlpack(labels)
            if self.augmenter is not None:
                positions = indices.numpy()
                copies = np.zeros(len(positions), dtype=bool)
                images = self.augmenter.batch(images, positions, copies, epoch)
            if self.pin_memory and torch.cuda.is_available():
                images = images.pin_memory()
            yield images, labels

    def close(self) -> None:
        """Let go of the running pass's tf.data iterator (and so its threads and buffers)."""
        running, self._running = self._running, None
        if running is not None:
            running.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


class TfDataEpochs:
    """Called with an epoch: that epoch's pipeline, seeded as the torch loader's, of (images,
    labels). `errors`: what tf.data raises for a damaged record; `damaged(e)`: the store's error
    for one."""

    def __init__(self, tf, pipeline: _Pipeline, seed: int, damaged):
        self.tf, self.pipeline, self.seed, self.damaged = tf, pipeline, seed, damaged
        self.errors = (tf.errors.DataLossError, tf.errors.InvalidArgumentError)

    def __call__(self, epoch: int):
        dataset = self.pipeline(epoch_seed(self.seed, epoch))
        # After the prefetch, in the consumer's call: a selection, no work to spread on threads.
        return dataset.map(self.tf.autograph.experimental.do_not_convert(_without_indices))


def _without_indices(images, labels, indices):
    return images, labels


class TfDataReader(TfRecordReader):
    """Random access (`read_items`, `labels`) through loadbench's record index of the shards
    (tf.data has none); `loader` is tf.data's own pipeline."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        refuse_balance(order, "tf-data")
        tf = _import_tensorflow()
        threads = cpu_budget(workers)
        _configure(tf, threads)
        pipeline = self._pipeline(tf, order, batch_size, threads)
        return TfDataBatches(
            tf, pipeline, order, batch_size=batch_size, augmenter=augmenter,
            pin_memory=pin_memory, damaged=self._damaged_shard,
        )  # fmt: skip

    def tf_dataset(self, order, *, batch_size: int, workers: int) -> TfDataEpochs:
        """The same pipeline for a consumer that stays in TensorFlow (a Keras run): epoch ->
        tf.data.Dataset of (float32 N,C,H,W in [0, 1], int64 labels), no torch in between.
        The consumer owns TensorFlow's runtime (devices, process-wide pools): it is not
        configured here; the pipeline's own threads are capped to `cpu_budget(workers)`."""
        refuse_balance(order, "tf-data")
        tf = _import_tensorflow()
        pipeline = self._pipeline(tf, order, batch_size, cpu_budget(workers))
        return TfDataEpochs(tf, pipeline, order.seed, self._damaged_shard)

    def _pipeline(self, tf, order, batch_size: int, threads: int) -> _Pipeline:
        counts = np.bincount(self.handle["index"]["shard"], minlength=len(self.shard_names))
        return _Pipeline(
            tf, self.files.local_paths(self.shard_names), counts, image_shape=self.image_shape,
            encoding=self.options["encoding"], keep=subset(order, self.count),
            shuffle=order.shuffle, buffer=self.options["shuffle_buffer"],
            batch_size=batch_size, threads=threads,
        )  # fmt: skip

    def _damaged_shard(self, error):
        """The damaged-store error for what tf.data raised: its message without TensorFlow's
        wrapping ("{{function_node ...}} corrupted record at 12540 [Op:IteratorGetNext]"); tf.data
        does not say which file of an interleave the record was in."""
        message = re.sub(r"\{\{[^}]*\}\}|\[Op:.*$", "", error.message)
        return self._damaged(f"a {self.split} shard", message)


@register_format
class TfDataPeer(PeerFormat, RecordFormat):
    name = "tf-data"
    own_order = True
    summary = "peer: TensorFlow tf.data (TFRecordDataset, parse_example) over the tfrecord shards"
    requires = ("tensorflow",)
    install = "tensorflow-cpu"
    raw_encoding = "raw"
    # The `tfrecord` format's shards, written by its writer (raw pixels by default, or png/jpeg),
    # so the two differ only in the pipeline that reads them.
    options = {
        **SHARD_OPTION,
        **encoding_options("raw"),
        "shuffle_buffer": Option(1000, "records in tf.data's shuffle buffer", kind=int,
                                 minimum=1),
    }  # fmt: skip
    writer_class = TfRecordWriter
    reader_class = TfDataReader
