"""The DALI side of the `dali-*` peers (`dali.py`): one pipeline graph per stored layout, and the
loader that builds a pipeline for each epoch and hands its batches to torch through DALI's
PyTorch plugin iterator.

Every graph has two outputs: the images, decoded and normalised to float32 CHW in [0, 1] by
`fn.crop_mirror_normalize` (as DALI's PyTorch examples do), and a key per sample from which the
loader finds the sample's store index: its label, and the seed of its augmentation, come from
that index. DALI is imported inside the functions, so listing formats imports none of it.
"""

from __future__ import annotations

import gc
import math
import weakref
from dataclasses import dataclass

import numpy as np

READER = "Reader"  # the reader's name, which DALIGenericIterator asks for the epoch's size


@dataclass(frozen=True)
class Epoch:
    """What one epoch's pipeline is built with."""

    number: int
    seed: int  # the reader's shuffle seed, from (seed, epoch)
    shuffle: bool
    gpu: bool  # decode with device="mixed" and normalise on the GPU


def decode_image(encoded, channels: int, gpu: bool):
    """JPEG/PNG bytes -> uint8 HWC images: nvJPEG on the GPU ("mixed") when there is one."""
    from nvidia.dali import fn, types

    output = types.GRAY if channels == 1 else types.RGB
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=output)


def raw_pixels(data, shape: tuple[int, int, int]):
    """A record's raw pixel bytes -> uint8 HWC image (the size is checked by the reshape)."""
    from nvidia.dali import fn

    return fn.reshape(data, shape=list(shape), layout="HWC")


def for_model(images, gpu: bool):
    """uint8 HWC -> float32 CHW in [0, 1], on the GPU when there is one."""
    from nvidia.dali import fn, types

    if gpu and images.device == "cpu":
        images = images.gpu()
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0]
    )


def source_info(data):
    """Each sample's `source_info` property (where the reader found it) as bytes, zero-padded
    to one length per batch so that the iterator can hand it over as one tensor."""
    from nvidia.dali import fn

    return fn.pad(fn.get_property(data, key="source_info"), fill_value=0)


class FilesGraph:
    """`fn.readers.file` over a list of image files + `fn.decoders.image`. The list holds only
    the epoch's samples (a carved subset reads only its own files), and each file's "label" is
    its store index: the class label is looked up from it."""

    reader = READER

    def __init__(self, files: list[str], indices: list[int], channels: int, initial_fill: int):
        self.files, self.indices = files, indices
        self.channels, self.initial_fill = channels, initial_fill

    def __call__(self, epoch: Epoch):
        from nvidia.dali import fn

        encoded, keys = fn.readers.file(
            files=self.files, labels=self.indices, random_shuffle=epoch.shuffle,
            initial_fill=self.initial_fill, seed=epoch.seed, pad_last_batch=True, name=READER,
        )  # fmt: skip
        return for_model(decode_image(encoded, self.channels, epoch.gpu), epoch.gpu), keys

    def to_indices(self, keys: np.ndarray) -> np.ndarray:
        return keys.reshape(-1).astype(np.int64)


class TfRecordGraph:
    """`fn.readers.tfrecord` over the shards with their index files; images raw or PNG/JPEG.
    A record's `source_info` is "<shard path> at index <offset>", found in the store's index."""

    reader = READER

    def __init__(self, paths, index_paths, encoding, shape, initial_fill, offsets: dict):
        self.paths, self.index_paths = paths, index_paths
        self.encoding, self.shape, self.initial_fill = encoding, shape, initial_fill
        self.offsets = offsets  # (shard path, byte offset) -> store index

    def __call__(self, epoch: Epoch):
        import nvidia.dali.tfrecord as tfrec
        from nvidia.dali import fn

        features = {"image/encoded": tfrec.FixedLenFeature((), tfrec.string, "")}
        records = fn.readers.tfrecord(
            path=self.paths, index_path=self.index_paths, features=features,
            random_shuffle=epoch.shuffle, initial_fill=self.initial_fill, seed=epoch.seed,
            pad_last_batch=True, name=READER,
        )  # fmt: skip
        data = records["image/encoded"]
        if self.encoding == "raw":
            images = raw_pixels(data, self.shape)
        else:
            images = decode_image(data, self.shape[2], epoch.gpu)
        return for_model(images, epoch.gpu), source_info(data)

    def to_indices(self, keys: np.ndarray) -> np.ndarray:
        found = []
        for row in keys:
            path, _, offset = bytes(row).rstrip(b"\0").decode().rpartition(" at index ")
            found.append(self.offsets[path, int(offset)])
        return np.asarray(found, dtype=np.int64)


class WebDatasetGraph:
    """`fn.readers.webdataset` over the tar shards with DALI's index files; `.npy` members go to
    `fn.decoders.numpy`, `.png`/`.jpg` to `fn.decoders.image`. A sample's `source_info` is
    "<tar path>:<offset>:<key>.<ext>", and its key is its store index."""

    reader = READER

    def __init__(self, paths, index_paths, ext: str, shape, initial_fill: int):
        self.paths, self.index_paths, self.ext = paths, index_paths, ext
        self.shape, self.initial_fill = shape, initial_fill

    def __call__(self, epoch: Epoch):
        from nvidia.dali import fn

        data = fn.readers.webdataset(
            paths=self.paths, index_paths=self.index_paths, ext=[self.ext],
            missing_component_behavior="error", random_shuffle=epoch.shuffle,
            initial_fill=self.initial_fill, seed=epoch.seed, pad_last_batch=True, name=READER,
        )  # fmt: skip
        if self.ext == "npy":
            images = fn.reshape(fn.decoders.numpy(data), shape=list(self.shape), layout="HWC")
        else:
            images = decode_image(data, self.shape[2], epoch.gpu)
        return for_model(images, epoch.gpu), source_info(data)

    def to_indices(self, keys: np.ndarray) -> np.ndarray:
        names = (bytes(row).rstrip(b"\0").decode().rpartition(":")[2] for row in keys)
        return np.fromiter((int(name.partition(".")[0]) for name in names), dtype=np.int64)


class NpyBatches:
    """The external source's callback (batch mode): batch `iteration` of the epoch's order,
    read from the memory map with one fancy-indexing call, and each sample's position in the
    epoch."""

    def __init__(self, path: str, indices: np.ndarray, batch_size: int):
        self.path, self.indices, self.batch_size = path, indices, batch_size
        self._images = None

    def __call__(self, info):
        start = info.iteration * self.batch_size
        if start >= len(self.indices):
            raise StopIteration
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        wanted = self.indices[start : start + self.batch_size]
        order = np.argsort(wanted, kind="stable")  # sorted reads from the map
        images = np.empty((len(wanted), *self._images.shape[1:]), dtype=self._images.dtype)
        images[order] = self._images[wanted[order]]
        positions = np.arange(start, start + len(wanted), dtype=np.int64)
        return images, positions[:, None]  # dense batches: one copy each into DALI


class NpyGraph:
    """`fn.external_source` over the `npy` format's one array per split, in loadbench's epoch
    order (the source is the user's own code, so it follows the run's sampler).

    Not `parallel=True`: DALI's Python workers copy every batch through shared memory and
    are forked again with each pipeline. On 20,000 32x32 images (2 threads, batches of 64,
    a busy 2-core machine) two of them gave 13-40k img/s, against 90-100k img/s for the
    source in the pipeline's own thread, whose work here is one memory-map read per batch."""

    reader = None  # no DALI reader: the source ends the epoch with StopIteration

    def __init__(self, path: str, batch_size: int):
        self.path, self.batch_size = path, batch_size
        self.source: NpyBatches | None = None

    def set_order(self, indices: np.ndarray) -> None:
        self.source = NpyBatches(self.path, indices, self.batch_size)

    def __call__(self, epoch: Epoch):
        from nvidia.dali import fn

        images, positions = fn.external_source(
            source=self.source, num_outputs=2, batch=True, batch_info=True,
            layout=["HWC", ""],
        )  # fmt: skip
        return for_model(images, epoch.gpu), positions


class DaliRun:
    """One epoch: its pipeline and the PyTorch plugin's iterator over it (the last batch
    partial, its size from the reader). `close` stops the pipeline's threads."""

    def __init__(self, graph, epoch: Epoch, batch_size: int, threads: int):
        from nvidia.dali import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = Pipeline(
            batch_size=batch_size, num_threads=threads, device_id=0 if epoch.gpu else None,
            seed=epoch.seed,
        )  # fmt: skip
        with pipe:
            pipe.set_outputs(*graph(epoch))
        self.pipe_ref = weakref.ref(pipe)
        self.iterator = DALIGenericIterator(
            [pipe], ["images", "keys"], reader_name=graph.reader,
            last_batch_policy=LastBatchPolicy.PARTIAL,
        )  # fmt: skip

    def __iter__(self):
        for (out,) in self.iterator:
            yield out["images"], out["keys"].numpy()

    def close(self) -> None:
        """Drop the pipeline: DALI stops its threads when the pipeline object goes (the
        iterator and DALI's graph nodes can hold it in a cycle)."""
        self.iterator = None
        if self.pipe_ref() is not None:
            gc.collect()
        pipe = self.pipe_ref()
        if pipe is not None:  # still referenced elsewhere: stop its executor now anyway
            pipe._shutdown()


class DaliEpochs:
    """A `dali-*` peer's loader: each pass builds the epoch's pipeline (its reader seeded from
    (seed, epoch), so an epoch's order does not depend on earlier passes), then yields
    (float32 images N,C,H,W, int64 labels N) of `batch_size`, the last batch partial.

    Labels come from the store's labels by store index; augmentation is seeded by
    (seed, epoch, store index) for the readers' own order, or by (seed, epoch, position) when
    the pipeline follows loadbench's order (`mapped`), as every other loader does.
    """

    def __init__(self, graph, order, batch_size: int, *, labels: np.ndarray, augmenter,
                 threads: int, keep=None, mapped: bool = False,
                 pin_memory: bool = False):  # fmt: skip
        self.graph, self.order, self.batch_size = graph, order, batch_size
        self.labels, self.augmenter, self.keep = labels, augmenter, keep
        self.threads = threads
        self.mapped, self.pin_memory = mapped, pin_memory
        self.runs: weakref.WeakSet[DaliRun] = weakref.WeakSet()

    def __len__(self) -> int:
        count = len(self.order) if self.mapped else len(np.unique(self.order.indices))
        return math.ceil(count / self.batch_size)

    def __iter__(self):
        import torch

        from loadbench.peers._base import epoch_seed
        from loadbench.peers._pipeline import rebatch

        if len(self) == 0:  # DALI's readers refuse an empty list
            return
        order = self.order
        epoch = Epoch(order.epoch, epoch_seed(order.seed, order.epoch), order.shuffle,
                      torch.cuda.is_available())  # fmt: skip
        drawn = self._draw()
        run = DaliRun(self.graph, epoch, self.batch_size, self.threads)
        self.runs.add(run)
        batches = (self._batch(images, keys, drawn, epoch) for images, keys in run)
        try:
            if self.keep is None:
                for batch in batches:
                    yield batch[:2]
            else:  # samples outside the subset were dropped: batches made whole again
                yield from rebatch(batches, self.batch_size, None, self.pin_memory)
        finally:
            # A pass cut short: its generators still hold DALI's iterator, and with it the
            # pipeline; closed first, they let `run.close()` free the pipeline at once.
            batches.close()
            run.close()

    def _draw(self):
        """(store indices, copy flags) of loadbench's epoch order, given to a graph that
        follows it; None for the readers' own order."""
        if not self.mapped:
            return None
        indices, copies = self.order.draw()
        self.graph.set_order(indices)
        return indices, copies

    def _batch(self, images, keys: np.ndarray, drawn, epoch: Epoch):
        """(images, labels, store indices) of one DALI batch, filtered and augmented."""
        import torch

        if drawn is not None:
            positions = keys.reshape(-1)
            indices, copies = drawn[0][positions], drawn[1][positions]
        else:
            indices = self.graph.to_indices(keys)
            if self.keep is not None:
                wanted = np.isin(indices, self.keep)
                if not wanted.all():
                    images = images[torch.from_numpy(wanted).to(images.device)]
                    indices = indices[wanted]
            positions, copies = indices, np.zeros(len(indices), dtype=bool)
        if self.augmenter is not None and len(indices):
            images = self.augmenter.batch(images, positions, copies, epoch.number)
        if self.pin_memory and not images.is_cuda and torch.cuda.is_available():
            images = images.pin_memory()
        return images, torch.from_numpy(self.labels[indices]), torch.from_numpy(indices)

    def close(self) -> None:
        """Stop the pipelines of passes still open (a pass cut short)."""
        for run in list(self.runs):
            run.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass
