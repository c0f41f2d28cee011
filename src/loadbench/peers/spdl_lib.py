"""`spdl-files`, `spdl-npy`: Meta's SPDL (Scalable and Performant Data Loading) pipelines over
the `files-*` class folders and over the `npy` format's arrays.

Built as SPDL's documentation builds a PyTorch-style loader: the sampler is the pipeline's
source, a batch is aggregated, then decoded by one stage run by a thread pool, and a sink
buffers the results; a fresh pipeline each epoch.
- https://facebookresearch.github.io/spdl/main/getting_started/pytorch.html ("Building
  High-Performance DataLoaders": sampler as source, `aggregate`, `add_sink`, one
  `builder.build()` per `__iter__`)
- https://facebookresearch.github.io/spdl/main/best_practice.html (decode each image, then
  one batch tensor with `spdl.io.convert_frames`: no per-image tensors)
- https://github.com/facebookresearch/spdl/blob/main/examples/image_dataloading.py
  (`add_source(paths).aggregate(b).pipe(load_image_batch, concurrency=n).add_sink(k)
  .build(num_threads=n)`)
- https://facebookresearch.github.io/spdl/main/io/numpy_arrays.html (`spdl.io.load_npy`, a
  zero-copy view of NPY bytes in memory: here the file's memory map)

The source is loadbench's own epoch order (`EpochOrder.draw()`), so both peers follow it exactly,
balancing included, and augment by (seed, epoch, position) as `KeyedSamples` does. Images are
decoded by FFmpeg, whose JPEG decoder and YUV->RGB conversion are not libjpeg-turbo's: a
`spdl-files` JPEG store keeps SPDL's own decode as its stored pixels (see `SpdlFilesWriter`).
"""

from __future__ import annotations

import functools
import math
import mmap
import struct

import numpy as np

from loadbench.formats import codecs
from loadbench.formats.base import register_format
from loadbench.formats.files import FilesReader, FilesWriter
from loadbench.formats.npy import NpyReader, NpyWriter, check_arrays
from loadbench.peers._base import FilesPeer, PeerFormat, cpu_budget

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What SPDL's FFmpeg binding links (any FFmpeg from 4 to 9); its wheel does not ship them.
FFMPEG_LIBRARIES = (
    "avutil",
    "avcodec",
    "avformat",
    "avdevice",
    "avfilter",
    "swscale",
    "swresample",
)


@functools.cache
def missing_ffmpeg() -> list[str]:
    """FFmpeg's shared libraries that the system lacks (found as the dynamic loader would)."""
    import ctypes.util

    return [f"lib{name}" for name in FFMPEG_LIBRARIES if ctypes.util.find_library(name) is None]


class Undecodable(ValueError):
    """Image `k` of a batch is not the JPEG or PNG image of the store's size."""

    def __init__(self, k: int, error: Exception | str):
        super().__init__(str(error))
        self.k = k


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header or a PNG's IHDR; None for anything else."""
    if data[:2] == codecs.JPEG_SOI:
        return codecs.jpeg_size(data)
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return height, width
    return None


def decode_images(datas: list[bytes], image_shape: tuple[int, int, int]):
    """JPEG/PNG bytes -> uint8 tensor (N, H, W, C): each image demuxed and decoded to RGB (or
    gray) by FFmpeg, then one batch tensor made by `convert_frames`, as SPDL's best practices
    do; `Undecodable` names the first bad image.

    This is `spdl.io.load_image_batch` (the same calls, the same default filter) with its
    errors kept per image: load_image_batch logs each failure and then raises one error for
    the batch. Each header's size is checked first: FFmpeg decodes whatever size a header
    declares (a few hundred bytes can declare gigapixels).
    """
    import spdl.io

    height, width, channels = image_shape
    filter_desc = spdl.io.get_video_filter_desc(pix_fmt="gray" if channels == 1 else "rgb24")
    frames = []
    for k, data in enumerate(datas):
        found = declared_size(data)
        if found != (height, width):
            said = "no JPEG frame header or PNG IHDR" if found is None else f"{found[0]}x{found[1]}"
            raise Undecodable(k, f"{said}, a {height}x{width} image expected")
        try:
            frame = spdl.io.decode_packets(spdl.io.demux_image(data), filter_desc=filter_desc)
        except (RuntimeError, ValueError, OSError) as e:
            raise Undecodable(k, e) from None
        if (frame.height, frame.width) != (height, width):
            raise Undecodable(k, f"{frame.height}x{frame.width} decoded")
        frames.append(frame)
    if not frames:
        import torch

        return torch.empty((0, *image_shape), dtype=torch.uint8)
    images = spdl.io.to_torch(spdl.io.convert_frames(frames))
    if tuple(images.shape) != (len(datas), *image_shape):
        raise Undecodable(0, f"a batch of {tuple(images.shape)} decoded")
    return images


# -- the pipeline -------------------------------------------------------------------------------


class _Failed:
    """An error raised in a pipeline thread, carried to the loop that reads the pipeline.

    SPDL drops an item whose stage raises and goes on (its documented default), and with
    `max_failures=0` it stops with its own `PipelineFailure` after logging the traceback;
    loadbench must lose no sample and report a damaged store as one line, so a stage returns
    its error and the epoch raises it."""

    def __init__(self, error: Exception):
        self.error = error


class _LoadBatch:
    """The pipeline's stage: a list of (position, store index, is_copy) -> (float32 images
    N,C,H,W in [0, 1], int64 labels N), augmented with (seed, epoch, position) as loadbench's
    `sample` access does."""

    def __init__(self, read, augmenter, epoch: int, pin_memory: bool):
        self.read, self.augmenter, self.epoch, self.pin_memory = read, augmenter, epoch, pin_memory

    def __call__(self, keys):
        import torch

        from loadbench.formats.pixels import to_tensor

        try:
            positions, indices, copies = (np.asarray(column) for column in zip(*keys, strict=True))
            images, labels = self.read(indices)
            images = to_tensor(images)
            if self.augmenter is not None:
                images = self.augmenter.batch(images, positions, copies, self.epoch)
            if self.pin_memory and torch.cuda.is_available():
                images = images.pin_memory()
            return images, torch.as_tensor(np.asarray(labels, dtype=np.int64))
        except Exception as e:  # noqa: BLE001 -- raised again by the epoch's loop
            return _Failed(e)


class SpdlEpochs:
    """The loader: an SPDL pipeline per epoch over `order.draw()`, `threads` decoding batches
    at once (the run's CPU budget), a sink of two batches per thread (a DataLoader's default
    prefetch). `close` stops the epoch's pipeline and its threads.

    The source hands SPDL one index at a time and `aggregate` batches them, as SPDL's guide
    does. That costs about 90 us of CPU an image (spdl 0.8.0, 2 busy cores, 2026-12-05): a
    source of ready-made index batches costs 5 us, but it is not what the guide shows."""

    def __init__(self, read, order, *, batch_size: int, threads: int, pin_memory: bool,
                 augmenter):  # fmt: skip
        self.read, self.order, self.batch_size, self.threads = read, order, batch_size, threads
        self.pin_memory, self.augmenter = pin_memory, augmenter
        self.pipeline = None

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def build(self):
        """This epoch's pipeline, as SPDL's DataLoader guide builds one per `__iter__`."""
        from spdl.pipeline import PipelineBuilder

        indices, copies = self.order.draw()
        keys = list(zip(range(len(indices)), indices.tolist(), copies.tolist(), strict=True))
        stage = _LoadBatch(self.read, self.augmenter, self.order.epoch, self.pin_memory)
        return (
            PipelineBuilder()
            .add_source(keys)
            .aggregate(self.batch_size)
            .pipe(stage, concurrency=self.threads, output_order="input")
            .add_sink(2 * self.threads)
            .build(num_threads=self.threads, max_failures=0)
        )

    def __iter__(self):
        self.close()  # an epoch left unfinished stops before the next one starts
        pipeline = self.pipeline = self.build()
        try:
            with pipeline.auto_stop():
                for item in pipeline.get_iterator():
                    if isinstance(item, _Failed):
                        raise item.error
                    yield item
        finally:
            if self.pipeline is pipeline:
                self.pipeline = None

    def close(self) -> None:
        """Stop the running epoch's pipeline: its event loop, source and worker threads."""
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.stop()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


def _loader(reader, order, batch_size, workers, pin_memory, augmenter) -> SpdlEpochs:
    return SpdlEpochs(reader.read_stored, order, batch_size=batch_size,
                      threads=cpu_budget(workers), pin_memory=pin_memory,
                      augmenter=augmenter)  # fmt: skip


# -- spdl-files ---------------------------------------------------------------------------------


class SpdlFilesWriter(FilesWriter):
    """`FilesWriter`'s files, byte for byte; a JPEG store's stored pixels (its checksums, what
    verify compares) are SPDL's decode of them, which differs from libjpeg-turbo's by up to a
    few levels (FFmpeg's IDCT and YUV->RGB conversion)."""

    def write(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        start = self.pos
        stored = super().write(images, labels)
        if self.codec != "jpeg" or not len(images):
            return stored
        datas = []
        for k, label in enumerate(labels):
            with open(self.path(start + k, int(label)), "rb") as f:
                datas.append(f.read())
        return decode_images(datas, images.shape[1:]).numpy()


class SpdlFilesReader(FilesReader):
    """Files read whole (in place, or from object storage), decoded by `decode_images`."""

    def read_items(self, indices):
        images, labels = self.read_stored(indices)
        return images.numpy(), labels

    def read_stored(self, indices):
        """(uint8 tensor N,H,W,C, labels) of store indices in any order."""
        labels = self.handle[indices].astype(np.int64)
        rels = [self.relpath(int(i), int(y)) for i, y in zip(indices, labels, strict=True)]
        try:
            datas = self.files.read_many(rels)
        except OSError as e:
            raise self._damaged(f"cannot read {', '.join(rels[:3])}", e) from None
        try:
            return decode_images(datas, self.image_shape), labels
        except Undecodable as e:
            raise self._damaged(f"cannot decode {rels[e.k]}", e) from None

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        _ = self.handle  # labels.npy read once, here, before the threads start
        return _loader(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class SpdlFilesPeer(FilesPeer):
    name = "spdl-files"
    summary = "peer: SPDL pipeline (FFmpeg decode, convert_frames) over class folders of JPEG/PNG"
    requires = ("spdl",)
    install = "spdl"
    # JPEG by default: what SPDL's image examples load (ImageNet's JPEG files).
    options = FilesPeer.files_options("jpeg")
    reader_class = SpdlFilesReader
    writer_class = SpdlFilesWriter  # built in `writer()`, with the encoding as its codec

    def missing(self) -> str | None:
        note = super().missing()
        if note is None and missing_ffmpeg():
            return (
                f"{self.name} needs FFmpeg's shared libraries (FFmpeg 4 to 9), which the spdl "
                f"wheel does not ship; not found: {', '.join(missing_ffmpeg())}: install "
                "FFmpeg (Debian: apt-get install ffmpeg)"
            )
        return note


# -- spdl-npy -----------------------------------------------------------------------------------


class SpdlNpyReader(NpyReader):
    """The `npy` format's files, memory-mapped and handed to `spdl.io.load_npy` (zero-copy)."""

    def _open(self):
        import spdl.io

        names = f"{self.split}_images.npy", f"{self.split}_labels.npy"
        arrays = []
        for name in names:
            try:
                with open(self.files.local_path(name), "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                arrays.append(spdl.io.load_npy(mapped))  # the array keeps the map alive
            except (OSError, ValueError, RuntimeError) as e:
                raise self._damaged(f"{name} cannot be loaded", e) from None
        images, labels = arrays
        check_arrays(self, names, (images.shape, images.dtype, not images.flags.c_contiguous),
                     (labels.shape, labels.dtype, not labels.flags.c_contiguous))  # fmt: skip
        return {"images": images, "labels": labels}

    def read_stored(self, indices):
        """(uint8 images N,H,W,C, labels) of store indices in any order: one gather."""
        h = self.handle
        return h["images"][indices], h["labels"][indices]

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        _ = self.handle  # mapped once, here, before the threads start
        return _loader(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class SpdlNpyPeer(PeerFormat):
    name = "spdl-npy"
    summary = "peer: SPDL pipeline over the npy format's arrays (spdl.io.load_npy, memory map)"
    requires = ("spdl",)
    install = "spdl"
    writer_class = NpyWriter  # the `npy` format's files, byte for byte
    reader_class = SpdlNpyReader

    def needs_local_file(self, options):
        return True  # memory-mapped
