"""`ffcv`: one FFCV `.beton` file per split, written by `ffcv.writer.DatasetWriter` (an
`RGBImageField`, raw pixels by default, and `IntField`s for the label and the store index) and
read by `ffcv.loader.Loader` with `OrderOption.RANDOM`, `os_cache=True` and a pipeline of
`SimpleRGBImageDecoder`, `ToTensor`, `ToTorchImage`, `Convert`, as FFCV's documentation and its
CIFAR example do: https://docs.ffcv.io/writing_datasets.html,
https://docs.ffcv.io/making_dataloaders.html, https://docs.ffcv.io/working_with_images.html and
https://github.com/libffcv/ffcv/blob/main/examples/cifar/train_cifar.py.

FFCV's loader runs its numba-compiled pipeline on threads, so it gets `cpu_budget(workers)` of
them. Its order is its own (a seeded permutation per epoch); augmentation is applied to each batch
it hands over, keyed by (seed, epoch, store index).

Grayscale: ffcv 1.0.2 has no one-channel image field (RGBImageField refuses any other shape;
libffcv/ffcv issues #197, #259, #351 wait for an unmerged pull request), so a one-channel image
is stored as three equal channels and the loader keeps the first: the store holds three times
the pixels, and FFCV decodes all three.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import threading
import time

import numpy as np

from loadbench.errors import LoadbenchError, OutOfSpaceError, free_bytes, reserve
from loadbench.formats import codecs
from loadbench.formats.base import Option, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.peers._base import PeerFormat, cpu_budget, epoch_seed, refuse_balance, subset

FIELDS = ("image", "label", "index")  # the .beton's fields, in this order
MODES = {"raw": 1, "jpeg": 0}  # RGBImageField's per-image `mode` for each encoding
CHUNK = 100  # images per task of DatasetWriter's worker processes (its default chunksize)
# DatasetWriter writes whole pages (8 MiB by default, 2 MiB at least), one at a time per worker,
# and the first page holds only the headers: with its default, 40 tiny images take 16 MiB.
PAGE_BYTES, MIN_PAGE_BYTES = 8 << 20, 2 << 20


def _import_ffcv():
    """Import ffcv, keeping torch's thread count: importing FFCV's compiler sets it to 1 (and
    each Loader, to its own thread count), which would slow the model's CPU work."""
    import torch

    threads = torch.get_num_threads()
    import ffcv

    torch.set_num_threads(threads)
    return ffcv


def _beton(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.beton")


def _encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """The JPEG bytes FFCV's RGBImageField writes for an H,W,3 image (OpenCV's encoder)."""
    _import_ffcv()
    from ffcv.fields.rgb_image import encode_jpeg

    return encode_jpeg(image, quality)


def _decode_jpeg(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """An H,W,3 image decoded by FFCV's own libjpeg-turbo call (the loader's), or None when
    libjpeg-turbo fails. It never writes past H,W,3: it scales down or fails instead."""
    _import_ffcv()
    from ffcv.libffcv import imdecode

    out = np.empty((*shape, 3), dtype=np.uint8)
    data = np.ascontiguousarray(data)
    height, width = shape
    failed = imdecode(data, out, height, width, height, width, 0, 0, 1, 1, False, False)
    return None if failed else out


class _Rows:
    """DatasetWriter's indexable dataset: store index -> (H,W,3 image, label, index)."""

    def __init__(self, pixels: str, labels: np.ndarray):
        self.pixels, self.labels = pixels, labels
        self._array = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self._array is None:
            self._array = np.load(self.pixels, mmap_mode="r")
        return np.array(self._array[index]), int(self.labels[index]), int(index)


class FfcvWriter(SplitWriter):
    """Pixels gathered in a scratch `.npy` (one-channel images as three equal channels), then one
    `DatasetWriter.from_indexed_dataset` over the split in index order."""

    def __init__(self, layout: SplitLayout):
        self.layout = layout
        self.path = _beton(layout.root, layout.split)
        self.scratch = os.path.join(layout.root, f".{layout.split}-pixels.npy")
        height, width, _ = layout.image_shape
        shape = (layout.count, height, width, 3)
        self.pixels = np.lib.format.open_memmap(self.scratch, "w+", np.uint8, shape)
        reserve([self.scratch], "converting into")  # a full disk: an error, not a SIGBUS
        self.labels = np.empty(layout.count, dtype=np.int64)
        self.pos = 0

    def write(self, images, labels):
        rgb = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images
        self.pixels[self.pos : self.pos + len(images)] = rgb
        self.labels[self.pos : self.pos + len(images)] = labels
        self.pos += len(images)
        if self.layout.options["encoding"] == "raw":
            return images
        # What the reader will decode: FFCV's JPEG (OpenCV) through FFCV's decoder.
        quality, stored = self.layout.options["jpeg_quality"], np.empty_like(images)
        for k, image in enumerate(rgb):
            stored[k] = _decode_jpeg(_encode_jpeg(image, quality), image.shape[:2])[
                :, :, : images.shape[3]
            ]
        return stored

    def close(self):
        self.pixels.flush()
        del self.pixels
        fields, workers = ffcv_fields(self.layout.options), self._workers()
        page = _page_bytes(self.layout, workers)
        needed = _beton_bytes(self.layout, workers, page)
        free = free_bytes(self.layout.root)
        if free is not None and free < needed:
            raise OutOfSpaceError(self.path, "converting into", needed, free)
        _write_beton(self.path, fields, _Rows(self.scratch, self.labels), workers, page)
        os.remove(self.scratch)
        return {}

    def abort(self):
        with contextlib.suppress(OSError):
            os.remove(self.scratch)

    def _workers(self) -> int:
        """DatasetWriter's processes: the cores this writer may use, and no more than it has
        chunks of images (each worker ends on a page of its own, written whole)."""
        cores = self.layout.threads or os.cpu_count() or 1
        return max(1, min(cores, math.ceil(self.layout.count / CHUNK)))


def ffcv_fields(options: dict) -> dict:
    """The .beton's fields: FFCV's RGBImageField (raw pixels or its JPEG) and two IntFields."""
    _import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    mode = "jpg" if options["encoding"] == "jpeg" else "raw"
    image = RGBImageField(write_mode=mode, jpeg_quality=options["jpeg_quality"])
    return {"image": image, "label": IntField(), "index": IntField()}


def _image_bytes(layout: SplitLayout) -> int:
    """An image's bytes in the .beton, at most (a JPEG of a tiny image can be larger than its
    pixels: 1 KiB more is allowed for that)."""
    height, width, _ = layout.image_shape
    return height * width * 3 + (1024 if layout.options["encoding"] == "jpeg" else 0)


def _page_bytes(layout: SplitLayout, workers: int) -> int:
    """DatasetWriter's default page, smaller (down to its minimum) for a split too small to
    fill a page per worker, larger for an image larger than a page (FFCV refuses those)."""
    image = _image_bytes(layout)
    page = MIN_PAGE_BYTES
    while page < min(PAGE_BYTES, layout.count * image / workers) or page < image:
        page *= 2
    return page


def _beton_bytes(layout: SplitLayout, workers: int, page: int) -> int:
    """An upper bound of the .beton's size: headers and metadata padded to a page, the pages
    of each worker (whole images per page, the last one partly filled), and the allocation
    table."""
    pages = layout.count // (page // _image_bytes(layout)) + workers
    return (pages + 1) * page + layout.count * 64


def _write_beton(path: str, fields: dict, rows, workers: int, page: int) -> None:
    """`DatasetWriter(...).from_indexed_dataset(rows)` in a forked child that is watched.

    DatasetWriter waits for its worker processes by polling a shared counter: a worker that dies
    (a full disk, a failed write) leaves it polling forever. Its child here exits as soon as
    one of its workers fails, and this process turns that into an error.
    """
    fork = multiprocessing.get_context("fork")
    child = fork.Process(target=_beton_child, args=(path, fields, rows, workers, page))
    child.start()
    try:
        child.join()
    except BaseException:  # Ctrl-C: the child and its workers get it too; do not wait for them
        child.terminate()
        raise
    if child.exitcode != 0:
        with contextlib.suppress(OSError):
            os.remove(path)
        free = free_bytes(os.path.dirname(path))
        if free is not None and free < (workers + 1) * page:
            raise OutOfSpaceError(path, "converting into", None, free)
        raise LoadbenchError(
            f"converting into {path}: ffcv's DatasetWriter failed (exit code {child.exitcode}); "
            "its worker's error is printed above"
        )


def _beton_child(path: str, fields: dict, rows, workers: int, page: int) -> None:
    from ffcv import writer as ffcv_writer

    # No progress bar of DatasetWriter's (loadbench shows its own); in this child only.
    ffcv_writer.tqdm = functools.partial(ffcv_writer.tqdm, disable=True)
    writer = ffcv_writer.DatasetWriter(path, fields, page_size=page, num_workers=workers)
    threading.Thread(target=_exit_when_a_worker_fails, daemon=True).start()
    writer.from_indexed_dataset(rows, chunksize=CHUNK)


def _exit_when_a_worker_fails() -> None:
    """Watch this process's children (DatasetWriter never joins them, so they stay to be
    seen); when one failed, stop the others (they may wait forever for its page) and exit."""
    import psutil

    me = psutil.Process()
    while True:
        children = me.children()
        for child in children:
            try:
                info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is not None and (info.si_code != os.CLD_EXITED or info.si_status != 0):
                for other in children:
                    with contextlib.suppress(psutil.Error):
                        other.kill()
                os._exit(3)
        time.sleep(0.05)


class FfcvReader(SplitReader):
    """Random access through the .beton's own tables, read with `ffcv.reader.Reader` (FFCV's
    loader has no access by index): an image's bytes are found as FFCV's OS-cache reader finds
    them, JPEG decoded by FFCV's own decoder. `loader` is `ffcv.loader.Loader`."""

    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        self.path = _beton(root, split)
        self.classes = len(manifest.classes)

    def _open(self):
        _import_ffcv()
        from ffcv.reader import Reader

        rel = f"{self.split}.beton"
        if problem := _header_problem(self.path, self.count):
            raise self._damaged(rel, problem)
        try:
            reader = Reader(self.path)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AssertionError) as e:
            raise self._damaged(rel, e) from None
        pixels = np.memmap(self.path, dtype=np.uint8, mode="r")
        where, problem = _locate(reader, self.count, self.image_shape, len(pixels))
        problem = problem or _metadata_problem(
            reader, self.count, self.image_shape, self.classes, self.options["encoding"]
        )
        if problem:
            raise self._damaged(rel, problem)
        labels = reader.metadata["f1"].astype(np.int64)
        return {"pixels": pixels, "starts": where[0], "sizes": where[1], "labels": labels}

    def labels(self) -> np.ndarray:
        return self.handle["labels"].copy()

    def read_items(self, indices):
        h, out = self.handle, self._empty(len(indices))
        height, width, channels = self.image_shape
        for k, index in enumerate(indices):
            start, size = int(h["starts"][index]), int(h["sizes"][index])
            data = h["pixels"][start : start + size]
            if self.options["encoding"] == "raw":
                image = data.reshape(height, width, 3)
            else:
                image = _decode_jpeg(data, (height, width))
                if image is None:
                    raise self._damaged(f"{self.split}.beton (image {index})", "not a JPEG")
            out[k] = image[:, :, :channels]
        return out, h["labels"][np.asarray(indices, dtype=np.int64)]

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        import torch

        refuse_balance(order, "ffcv")
        torch_threads = torch.get_num_threads()  # each Loader sets torch's to its own count
        self.handle  # noqa: B018 -- the .beton is checked before FFCV's compiled code reads it
        import numba
        from ffcv.loader import Loader, OrderOption

        threads = min(cpu_budget(workers), numba.config.NUMBA_NUM_THREADS)
        loader = Loader(
            self.path,
            batch_size=batch_size,
            num_workers=threads,
            os_cache=True,
            order=OrderOption.RANDOM if order.shuffle else OrderOption.SEQUENTIAL,
            # FFCV's RANDOM order seeds each epoch with seed + epoch: epoch_seed(seed, epoch).
            seed=epoch_seed(order.seed, 0),
            indices=subset(order, self.count),
            pipelines=_pipelines(self.image_shape[2]),
            drop_last=False,
        )
        torch.set_num_threads(torch_threads)
        return FfcvEpochs(loader, order, augmenter, pin_memory, torch_threads)


def _pipelines(channels: int) -> dict:
    """FFCV's pipeline of each field: uint8 H,W,3 decoded on FFCV's threads, then a float32
    N,C,H,W tensor in [0, 1] (one channel for a one-channel store)."""
    import torch
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Squeeze, ToTensor, ToTorchImage

    image = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(), Convert(torch.float32)]
    return {
        "image": [*image, _unit_range(channels)],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
        "index": [IntDecoder(), ToTensor(), Squeeze()],
    }


def _unit_range(channels: int):
    """A torch module in FFCV's pipeline (as its docs put torchvision's Normalize there)."""
    import torch

    class UnitRange(torch.nn.Module):
        """0..255 -> 0..1, and the first `channels` channels."""

        def __init__(self, channels: int):
            super().__init__()
            self.channels = channels

        def forward(self, images):
            return images[:, : self.channels].div(255)

    return UnitRange(channels)


class FfcvEpochs:
    """`ffcv.loader.Loader`, one pass per epoch: its epoch set to loadbench's before each pass
    (so that a pass cut short does not shift the next epoch's order), augmentation per batch
    keyed by (seed, epoch, store index), and a pass left early closed."""

    def __init__(self, loader, order, augmenter, pin_memory: bool, torch_threads: int):
        self.loader, self.order, self.augmenter = loader, order, augmenter
        self.pin_memory, self.torch_threads = pin_memory, torch_threads
        self.current = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import torch

        self.close()
        self.loader.next_epoch = self.order.epoch
        self.current = iter(self.loader)
        torch.set_num_threads(self.torch_threads)
        pin = self.pin_memory and torch.cuda.is_available()
        for images, labels, indices in self.current:
            # FFCV reuses its label and index buffers a few batches later: keep copies.
            labels, indices = labels.clone(), indices.numpy().copy()
            if self.augmenter is not None:
                copies = np.zeros(len(indices), dtype=bool)
                images = self.augmenter.batch(images, indices, copies, self.order.epoch)
            yield (images.pin_memory() if pin else images), labels
        self.current = None

    def close(self) -> None:
        """Stop the thread of a pass left early (it would wait for its queue to drain)."""
        current, self.current = self.current, None
        if current is not None:
            current.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 -- contextlib may be gone at interpreter shutdown
            self.close()
        except Exception:
            pass


def _header_problem(path: str, count: int) -> str | None:
    """What in the .beton's header is not as `FfcvWriter` wrote it, read before
    `ffcv.reader.Reader` sizes its reads by it."""
    _import_ffcv()
    from ffcv.types import CURRENT_VERSION, HeaderType

    try:
        header = np.fromfile(path, dtype=HeaderType, count=1)
    except (OSError, ValueError) as e:
        return str(e)
    if len(header) != 1:
        return "no header"
    version, fields = int(header[0]["version"]), int(header[0]["num_fields"])
    samples = int(header[0]["num_samples"])
    if version != CURRENT_VERSION:
        return f"format version {version}, not {CURRENT_VERSION} (ffcv 1.0's)"
    if fields != len(FIELDS) or samples != count:
        return f"{fields} fields and {samples} images, not {len(FIELDS)} and {count}"
    return None


def _locate(reader, count: int, shape, file_bytes: int):
    """((starts, sizes) of each image's bytes, None), or (None, what is wrong): every image
    has one allocation that lies in the file, of its pixels' size when raw. FFCV's loader
    copies an image's allocation into a buffer of H*W*3 bytes without checking it."""
    table = reader.alloc_table
    if len(table) != count or not np.array_equal(np.sort(table["sample_id"]), np.arange(count)):
        return None, f"{len(table)} allocations for {count} images"
    image = reader.metadata["f0"]
    table = table[np.argsort(table["sample_id"], kind="stable")]
    starts, sizes = table["ptr"], table["size"]
    if not np.array_equal(image["data_ptr"], starts):
        return None, "images whose data pointer is not their allocation"
    if np.any(starts > file_bytes) or np.any(sizes > file_bytes - np.minimum(starts, file_bytes)):
        return None, "an image past the end of the file"
    raw = image["mode"] == MODES["raw"]
    if np.any(raw & (sizes != shape[0] * shape[1] * 3)) or np.any(sizes == 0):
        return None, "an image of another size than its pixels"
    if len(np.unique(starts)) != count:
        return None, "two images at one place"
    return (starts.astype(np.int64), sizes.astype(np.int64)), None


def _metadata_problem(reader, count, shape, classes: int, encoding: str) -> str | None:
    """What in the .beton's fields and metadata is not as `FfcvWriter` wrote it."""
    from ffcv.fields import IntField, RGBImageField

    kinds = [type(reader.handlers.get(name)) for name in FIELDS]
    if reader.field_names != list(FIELDS) or kinds != [RGBImageField, IntField, IntField]:
        return f"fields {reader.field_names}, not {list(FIELDS)}"
    if int(reader.num_samples) != count:
        return f"{reader.num_samples} images, not {count}"
    image, labels = reader.metadata["f0"], reader.metadata["f1"]
    if np.any(image["mode"] != MODES[encoding]):
        return f"images not stored as {encoding}"
    if np.any(image["height"] != shape[0]) or np.any(image["width"] != shape[1]):
        return f"images of another size than {shape[0]}x{shape[1]}"
    if not np.array_equal(reader.metadata["f2"], np.arange(count)):
        return "an index field out of order"
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        return f"labels outside 0..{classes - 1}"
    return None


@register_format
class FfcvPeer(PeerFormat):
    name = "ffcv"
    own_order = True
    summary = "peer: FFCV .beton files (DatasetWriter) + ffcv.loader.Loader (numba threads)"
    requires = ("ffcv",)
    # ffcv has no wheel: pip builds it against these Debian packages (`.ci/run` installs them).
    install = (
        "ffcv (it builds against system libraries: apt-get install pkg-config g++ "
        "libturbojpeg0-dev libopencv-dev)"
    )
    # raw by default: exactly the source's pixels, and FFCV's own default write_mode.
    options = {
        "encoding": Option("raw", "how an image is stored", choices=("raw", "jpeg")),
        "jpeg_quality": codecs.JPEG_OPTIONS["jpeg_quality"],
    }
    writer_class = FfcvWriter
    reader_class = FfcvReader

    def check(self, dtype, options):
        codecs.check_quality(self.name, options)

    def is_lossy(self, options):
        return options["encoding"] == "jpeg"

    def needs_local_file(self, options):
        return True  # memory-mapped by FFCV's loader and by the reader
