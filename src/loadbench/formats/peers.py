"""Peer loaders: other projects' own libraries, run as their users run them, over the same data.

- `torchvision-imagefolder`: class folders of PNG/JPEG files (the `files-*` layout) read by
  `torchvision.datasets.ImageFolder(..., transform=ToTensor())` + a DataLoader.
- `webdataset-lib`: the `webdataset` format's tar shards read by the `webdataset` library's own
  pipeline (`wds.WebDataset` -> shuffle -> decode -> to_tuple -> batched, `wds.WebLoader`).
- `hf-datasets`: a Hugging Face `datasets` Arrow dataset per split (`save_to_disk`), read with
  `load_from_disk(...).with_format("torch")` + a DataLoader.
- `litdata`: Lightning's `litdata.optimize` chunks read by `StreamingDataset` +
  `StreamingDataLoader`.

The map-style peers (ImageFolder, datasets) see exactly loadbench's epoch order (a sampler that
follows `EpochOrder.draw()`); the streaming peers (webdataset, litdata) use their library's own
shuffle, seeded from (seed, epoch), which is what their users get. Every library is imported
inside the reader or writer that uses it, so this module imports without any of them.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil

import numpy as np
import torch
import torch.utils.data

from loadbench.errors import LoadbenchError
from loadbench.formats import codecs
from loadbench.formats.base import (
    Format,
    Option,
    SplitLayout,
    SplitReader,
    SplitWriter,
    register_format,
    to_tensor,
)
from loadbench.formats.files import FilesReader, FilesWriter
from loadbench.formats.records import SHARD_OPTION, RecordFormat, encoding_options
from loadbench.formats.webdataset import EXTENSION, WebDatasetReader, WebDatasetWriter


class _PeerFormat(Format):
    peer = True
    accesses = ("sample",)  # peers run their own pipeline, one sample at a time
    dtypes = ("uint8",)


# -- what every peer loader shares ---------------------------------------------------------------


class _SharedEpoch:
    """The current epoch, readable by persistent DataLoader workers.

    Workers hold copies of the dataset made when they started, so a plain attribute set by the
    training loop would stay stale there; a shared-memory tensor does not.
    """

    def __init__(self):
        self.value = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self.value[0] = epoch

    def get(self) -> int:
        return int(self.value[0])


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 31)


def _common(workers: int, pin_memory: bool) -> dict:
    return {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}


def _refuse_balance(order, name: str) -> None:
    if order.balance != "none":
        raise LoadbenchError(
            f"{name} streams in its library's own order, so it cannot draw balance="
            f"{order.balance}; use balance none, or a map-style peer (torchvision-imagefolder, "
            "hf-datasets) or a loadbench format"
        )


def _subset(order, count: int) -> np.ndarray | None:
    """The indices an epoch keeps, or None when it is the whole split."""
    indices = np.unique(order.indices)
    if len(indices) == count:
        return None
    return indices


class _KeyedSamples(torch.utils.data.Dataset):
    """Map-style peers: keys are `EpochSampler` tuples (position, index, copy, epoch).

    The reader's `samples(indices)` goes through the peer's library; augmentation is seeded by
    (seed, epoch, position) exactly as loadbench's own `sample` access does.
    """

    def __init__(self, reader, augmenter):
        self.reader, self.augmenter = reader, augmenter

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        # DataLoader hands a whole batch of keys here when it exists (datasets' batched fetch).
        items = self.reader.samples([k[1] for k in keys])
        if self.augmenter is None:
            return items
        return [
            (self.augmenter(image, k[0], k[2], k[3]), label)
            for (image, label), k in zip(items, keys, strict=True)
        ]


def _map_style_loader(reader, order, batch_size, workers, pin_memory, augmenter):
    from loadbench.training.data import EpochSampler

    return torch.utils.data.DataLoader(
        _KeyedSamples(reader, augmenter),
        batch_size=batch_size,
        sampler=EpochSampler(order),
        **_common(workers, pin_memory),
    )


def _collate(samples):
    """(image C,H,W, label, index) samples -> (images N,C,H,W, labels N, indices N)."""
    images, labels, indices = zip(*samples, strict=True)
    return (
        torch.stack(list(images)),
        torch.as_tensor([int(x) for x in labels], dtype=torch.int64),
        torch.as_tensor([int(x) for x in indices], dtype=torch.int64),
    )


class _Sample:
    """One decoded image -> (float32 C,H,W in [0, 1], label, index), augmented in the worker.

    Streaming peers have no epoch position for a sample, so augmentation is seeded by
    (seed, epoch, store index) instead.
    """

    def __init__(self, augmenter, epoch: _SharedEpoch):
        self.augmenter, self.epoch = augmenter, epoch

    def __call__(self, image, label, index):
        image = np.asarray(image)
        tensor = to_tensor(image[:, :, None] if image.ndim == 2 else image)
        index = int(index)
        if self.augmenter is not None:
            tensor = self.augmenter(tensor, index, False, self.epoch.get())
        return tensor, int(label), index


def _rebatch(batches, size: int, keep: np.ndarray | None, pin_memory: bool):
    """Batches of exactly `size` (the last one partial) from batches of any size, keeping only
    samples whose index is in `keep` (None: all)."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    held = 0
    for images, labels, indices in batches:
        if keep is not None:
            mask = torch.from_numpy(np.isin(indices.numpy(), keep))
            if not bool(mask.all()):
                images, labels = images[mask], labels[mask]
        if not pending and len(labels) == size:
            yield images, labels
            continue
        pending.append((images, labels))
        held += len(labels)
        while held >= size:
            images, labels = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            yield _pinned(images[:size], pin_memory), labels[:size]
            pending = [(images[size:], labels[size:])] if held > size else []
            held -= size
    if held:
        images, labels = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
        yield _pinned(images, pin_memory), labels


def _pinned(images: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    return images.pin_memory() if pin_memory and torch.cuda.is_available() else images


class _StreamEpochs:
    """A streaming peer's loader, once per epoch: tells the workers the epoch, then yields
    (images, labels) of `batch_size` (the last batch partial)."""

    def __init__(self, loader, order, batch_size: int, epoch: _SharedEpoch, *, keep=None,
                 rebatch: bool, pin_memory: bool, before_epoch=None):  # fmt: skip
        self.loader, self.order, self.batch_size, self.epoch = loader, order, batch_size, epoch
        self.keep, self.rebatch, self.pin_memory = keep, rebatch, pin_memory
        self.before_epoch = before_epoch

    def __len__(self) -> int:
        return math.ceil(len(np.unique(self.order.indices)) / self.batch_size)

    def __iter__(self):
        self.epoch.set(self.order.epoch)
        if self.before_epoch is not None:
            self.before_epoch(self.order.epoch)
        batches = (tuple(batch) for batch in self.loader)
        if self.rebatch or self.keep is not None:
            yield from _rebatch(batches, self.batch_size, self.keep, self.pin_memory)
            return
        for images, labels, _ in batches:
            yield images, labels

    def close(self) -> None:
        """Stop persistent workers now. litdata's iterator holds its loader (a reference
        cycle), so otherwise the garbage collector stops them, after the queues they listen on
        are finalized: torch then waits 5 s for each worker before killing it."""
        from loadbench.training.data import shutdown

        shutdown(self.loader)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


# -- torchvision ImageFolder -----------------------------------------------------------------------


def _gray_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("L")


class ImageFolderReader(FilesReader):
    """`ImageFolder` over the split's class folders (the `files-*` layout, whose fields it
    takes from `FilesReader`); files are named by store index."""

    def _open(self):
        from torchvision import datasets, transforms

        extra = {"loader": _gray_loader} if self.image_shape[2] == 1 else {}
        try:
            # allow_empty: a small split may lack a class; its folder is there, empty.
            folder = datasets.ImageFolder(
                self.dir, transform=transforms.ToTensor(), allow_empty=True, **extra
            )
        except (OSError, ValueError) as e:
            raise self._damaged(f"ImageFolder cannot open {self.dir}", e) from None
        if folder.classes != self.class_dirs:
            raise self._damaged(self.split, f"class folders {folder.classes}")
        # ImageFolder sorts by class folder, then file name; the file name is the store index.
        positions = np.full(self.count, -1, dtype=np.int64)
        for position, (path, _) in enumerate(folder.samples):
            index = int(os.path.splitext(os.path.basename(path))[0])
            if 0 <= index < self.count:
                positions[index] = position
        if len(folder.samples) != self.count or (positions < 0).any():
            raise self._damaged(self.split, f"{len(folder.samples)} image files")
        labels = np.asarray(folder.targets, dtype=np.int64)[positions]
        return {"folder": folder, "positions": positions, "labels": labels}

    @property
    def handle(self):
        # ImageFolder holds lists, not open files: forked workers use the parent's, as in a
        # user's script, instead of each scanning the folders again.
        if self._handle is None:
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def labels(self) -> np.ndarray:
        return self.handle["labels"].copy()

    def read_items(self, indices):
        h = self.handle
        folder, out = h["folder"], self._empty(len(indices))
        for k, index in enumerate(indices):
            path = folder.samples[h["positions"][index]][0]
            try:
                image = np.asarray(folder.loader(path), dtype=np.uint8)
            except (OSError, ValueError, SyntaxError) as e:
                raise self._damaged(f"cannot read {path}", e) from None
            out[k] = image[:, :, None] if image.ndim == 2 else image
        return out, h["labels"][indices]

    def samples(self, indices):
        h = self.handle
        return [h["folder"][int(h["positions"][i])] for i in indices]

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        _ = self.handle  # scan the folders once, here, before the workers start
        return _map_style_loader(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class ImageFolderPeer(_PeerFormat):
    name = "torchvision-imagefolder"
    summary = "peer: torchvision ImageFolder + DataLoader over class folders of PNG/JPEG files"
    requires = ("torchvision",)
    install = "torchvision"
    # PNG by default: lossless, so the peer trains on the very pixels the other stores hold.
    options = {
        "encoding": Option("png", "image file type", choices=("png", "jpeg")),
        **codecs.JPEG_OPTIONS,
        **codecs.PNG_OPTIONS,
    }
    reader_class = ImageFolderReader
    writer_class = FilesWriter  # built in `writer()`, with the encoding as its codec
    tracks_every_file = False  # one file per image: the manifest lists labels.npy only

    def writer(self, layout: SplitLayout) -> SplitWriter:
        return FilesWriter(layout, layout.options["encoding"])

    def check(self, dtype, options):
        codecs.check_quality(self.name, options)

    def is_lossy(self, options):
        return options["encoding"] == "jpeg"


# -- webdataset (the library's pipeline) -----------------------------------------------------------


class _KeyIn:
    """`select` predicate: the sample's key (its store index) is one of `keep`."""

    def __init__(self, keep: np.ndarray):
        self.keep = frozenset(keep.tolist())

    def __call__(self, sample) -> bool:
        return int(sample["__key__"]) in self.keep


class _WebDatasetStream(torch.utils.data.IterableDataset):
    """The webdataset pipeline, rebuilt each epoch (in each worker) with seeds from
    (seed, epoch): shard shuffle after the split by worker, then a buffer shuffle."""

    def __init__(self, urls, ext, channels, keep, shuffle, seed, buffer, batch_size, augmenter):
        self.urls, self.ext, self.channels = urls, ext, channels
        self.keep, self.shuffle, self.seed, self.buffer = keep, shuffle, seed, buffer
        self.batch_size = batch_size
        self.epoch = _SharedEpoch()
        self.sample = _Sample(augmenter, self.epoch)

    def __iter__(self):
        import webdataset as wds

        seed = _epoch_seed(self.seed, self.epoch.get())
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # empty_check off: with more workers than shards some workers get no shard, by design.
        dataset = wds.WebDataset(
            self.urls,
            shardshuffle=len(self.urls) if self.shuffle else False,
            seed=seed,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        if self.keep is not None:
            dataset = dataset.select(_KeyIn(self.keep))
        if self.shuffle:
            dataset = dataset.shuffle(self.buffer, seed=seed * 131 + worker)
        dataset = (
            dataset.decode("l8" if self.channels == 1 else "rgb8")
            .to_tuple(self.ext, "cls", "__key__")
            .map(lambda sample: self.sample(*sample))
            .batched(self.batch_size, collation_fn=_collate, partial=True)
        )
        return iter(dataset)


class WebDatasetLibReader(WebDatasetReader):
    """Random access (`read_items`, `labels`) through loadbench's member index of the same
    shards (the library has none); `loader` is the library's own streaming pipeline."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        import webdataset as wds

        _refuse_balance(order, "webdataset-lib")
        stream = _WebDatasetStream(
            urls=[os.path.join(self.root, name) for name in self.shard_names],
            ext=EXTENSION[self.options["encoding"]],
            channels=self.image_shape[2],
            keep=_subset(order, self.count),
            shuffle=order.shuffle,
            seed=order.seed,
            buffer=self.options["shuffle_buffer"],
            batch_size=batch_size,
            augmenter=augmenter,
        )
        loader = wds.WebLoader(stream, batch_size=None, **_common(workers, pin_memory))
        if workers > 1:
            # Each worker ends its stream with a partial batch: rebatch across workers, as the
            # webdataset docs do (`loader.unbatched().batched(...)`).
            loader = loader.unbatched().batched(batch_size, collation_fn=_collate, partial=True)
        return _StreamEpochs(
            loader, order, batch_size, stream.epoch, rebatch=False, pin_memory=pin_memory
        )


@register_format
class WebDatasetLibPeer(_PeerFormat, RecordFormat):
    name = "webdataset-lib"
    own_order = True
    summary = "peer: the webdataset library's pipeline + WebLoader over the webdataset shards"
    requires = ("webdataset",)
    install = "webdataset"
    raw_encoding = "npy"
    # npy by default, as the `webdataset` format: byte-identical shards, so the two differ only
    # in the pipeline that reads them.
    options = {
        **SHARD_OPTION,
        **encoding_options("npy"),
        "shuffle_buffer": Option(1000, "samples in webdataset's shuffle buffer", kind=int,
                                 minimum=1),
    }  # fmt: skip
    writer_class = WebDatasetWriter
    reader_class = WebDatasetLibReader


# -- Hugging Face datasets -------------------------------------------------------------------------


def _import_datasets():
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet_datasets(datasets):
    """No tqdm bars from `datasets` while loadbench shows its own progress."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _hf_features(datasets, layout: SplitLayout):
    image = (
        datasets.Image()
        if layout.options["encoding"] == "png"
        else datasets.Array3D(shape=tuple(layout.image_shape), dtype="uint8")
    )
    return datasets.Features({"image": image, "label": datasets.ClassLabel(names=layout.classes)})


class HfDatasetsWriter(SplitWriter):
    """Rows into an Arrow file (the writer `Dataset.from_generator` uses), then
    `save_to_disk` into `<split>/` as a user would."""

    def __init__(self, layout: SplitLayout):
        datasets = _import_datasets()
        from datasets.arrow_writer import ArrowWriter

        self.layout = layout
        self.scratch = os.path.join(layout.root, f".{layout.split}.arrow")
        self.writer = ArrowWriter(features=_hf_features(datasets, layout), path=self.scratch)

    def write(self, images, labels):
        if self.layout.options["encoding"] == "png":
            column = [
                {"bytes": codecs.encode(image, "png", self.layout.options), "path": None}
                for image in images
            ]
        else:
            column = list(images)
        self.writer.write_batch({"image": column, "label": [int(x) for x in labels]})
        return images  # PNG and raw arrays are both lossless

    def close(self):
        datasets = _import_datasets()
        self.writer.finalize()
        self.writer.close()
        dataset = datasets.Dataset.from_file(self.scratch)
        with _quiet_datasets(datasets):
            dataset.save_to_disk(os.path.join(self.layout.root, self.layout.split))
        del dataset
        os.remove(self.scratch)
        return {}


class HfDatasetsReader(SplitReader):
    """`load_from_disk` (memory-mapped Arrow); samples through `with_format("torch")`."""

    def _open(self):
        datasets = _import_datasets()
        path = os.path.join(self.root, self.split)
        try:
            with _quiet_datasets(datasets):
                dataset = datasets.load_from_disk(path)
        except (OSError, ValueError) as e:
            raise self._damaged(f"load_from_disk({path})", e) from None
        if len(dataset) != self.count:
            raise self._damaged(self.split, f"{len(dataset)} rows")
        return {
            "dataset": dataset,
            "torch": dataset.with_format("torch"),
            "numpy": dataset.with_format("numpy"),
        }

    def labels(self) -> np.ndarray:
        # The Arrow column itself: no image is decoded.
        return self.handle["dataset"].data.column("label").to_numpy().astype(np.int64)

    def read_items(self, indices):
        rows = self.handle["numpy"][np.asarray(indices, dtype=np.int64)]
        images = np.asarray(rows["image"])
        if images.ndim == 3:  # grayscale PNG decodes to (n, H, W)
            images = images[..., None]
        # The numpy (and torch) formatter widens integer arrays to int64; PNG images stay uint8.
        return images.astype(np.uint8, copy=False), np.asarray(rows["label"], dtype=np.int64)

    def samples(self, indices):
        rows = self.handle["torch"].__getitems__([int(i) for i in indices])
        return [(self._image_tensor(row["image"]), int(row["label"])) for row in rows]

    def _image_tensor(self, image: torch.Tensor) -> torch.Tensor:
        if self.options["encoding"] == "png":  # the torch formatter gives PIL images as uint8 C,H,W
            return image.float().div_(255)
        return image.permute(2, 0, 1).float().div_(255)  # Array3D arrives as int64 H,W,C

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        return _map_style_loader(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class HfDatasetsPeer(_PeerFormat):
    name = "hf-datasets"
    summary = "peer: Hugging Face datasets (Arrow, load_from_disk, torch format) + DataLoader"
    requires = ("datasets",)
    install = "datasets"
    # PNG by default: how image datasets (CIFAR-10 among them) are stored on the Hub, so this is
    # what a datasets user trains from; `array` (lossless, no decode) is there for comparison.
    options = {
        "encoding": Option("png", "how an image is stored", choices=("png", "array")),
        **codecs.PNG_OPTIONS,
    }
    writer_class = HfDatasetsWriter
    reader_class = HfDatasetsReader


# -- litdata -------------------------------------------------------------------------------------


def _import_litdata():
    # litdata can ask PyPI for a newer version; off by default in 0.2.76, kept off here.
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    import litdata

    return litdata


class _LitdataItem:
    """`optimize`'s function: store index -> {"index", "image" (uint8 H,W,C), "label"}."""

    def __init__(self, pixels: str, labels: np.ndarray):
        self.pixels, self.labels = pixels, labels
        self._array = None

    def __call__(self, index: int) -> dict:
        if self._array is None:
            self._array = np.load(self.pixels, mmap_mode="r")
        return {
            "index": index,
            "image": np.array(self._array[index]),
            "label": int(self.labels[index]),
        }


@contextlib.contextmanager
def _optimizer_cache(root: str):
    """`optimize` keeps scratch folders under $TMPDIR/chunks and /data; keep them in the store's
    own temporary folder instead, removed with it."""
    keys = {"DATA_OPTIMIZER_CACHE_FOLDER": "chunks", "DATA_OPTIMIZER_DATA_CACHE_FOLDER": "data"}
    saved = {key: os.environ.get(key) for key in keys}
    scratch = os.path.join(root, ".litdata-cache")
    for key, name in keys.items():
        os.environ[key] = os.path.join(scratch, name)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(scratch, ignore_errors=True)


class LitdataWriter(SplitWriter):
    """Pixels gathered in a scratch `.npy`, then one `litdata.optimize` run over the split in
    index order (one process, `keep_data_ordered`), so item i of the chunks is store index i."""

    def __init__(self, layout: SplitLayout):
        self.layout = layout
        self.dir = os.path.join(layout.root, layout.split)
        self.scratch = os.path.join(layout.root, f".{layout.split}-pixels.npy")
        shape = (layout.count, *layout.image_shape)
        self.pixels = np.lib.format.open_memmap(self.scratch, "w+", np.uint8, shape)
        self.labels = np.empty(layout.count, dtype=np.int64)
        self.pos = 0

    def write(self, images, labels):
        self.pixels[self.pos : self.pos + len(images)] = images
        self.labels[self.pos : self.pos + len(images)] = labels
        self.pos += len(images)
        return images

    def close(self):
        litdata = _import_litdata()
        self.pixels.flush()
        del self.pixels
        # fork: a spawned worker would import torch and loadbench again for every split.
        start = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with _optimizer_cache(self.layout.root):
            litdata.optimize(
                fn=_LitdataItem(self.scratch, self.labels),
                inputs=list(range(self.layout.count)),
                output_dir=self.dir,
                chunk_bytes=f"{self.layout.options['chunk_mb']}MB",
                num_workers=1,
                reorder_files=False,
                keep_data_ordered=True,
                start_method=start,
                verbose=False,
            )
        os.remove(self.scratch)
        # Labels beside the chunks too: litdata has no column access, and reading every item
        # for them would copy every image.
        np.save(os.path.join(self.dir, "labels.npy"), self.labels)
        return {}


class _LitdataSample:
    """StreamingDataset `transform`: item dict -> (float32 C,H,W, label, index)."""

    def __init__(self, augmenter, epoch: _SharedEpoch):
        self.sample = _Sample(augmenter, epoch)

    def __call__(self, item):
        return self.sample(item["image"], item["label"], item["index"])


class LitdataReader(SplitReader):
    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        self.dir = os.path.join(root, split)

    def _open(self):
        litdata = _import_litdata()
        try:
            dataset = litdata.StreamingDataset(self.dir)
            labels = np.load(os.path.join(self.dir, "labels.npy"))
        except (OSError, ValueError) as e:
            raise self._damaged(f"litdata chunks in {self.dir}", e) from None
        if len(dataset) != self.count or len(labels) != self.count:
            raise self._damaged(self.split, f"{len(dataset)} items, {len(labels)} labels")
        return {"dataset": dataset, "labels": labels}

    def labels(self) -> np.ndarray:
        return self.handle["labels"].astype(np.int64)

    def read_items(self, indices):
        dataset, out = self.handle["dataset"], self._empty(len(indices))
        labels = np.empty(len(indices), dtype=np.int64)
        for k, index in enumerate(indices):
            item = dataset[int(index)]
            if item["index"] != index:
                raise self._damaged(self.split, f"item {index} holds sample {item['index']}")
            image = np.asarray(item["image"])
            out[k] = image[:, :, None] if image.ndim == 2 else image
            labels[k] = item["label"]
        return out, labels

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        litdata = _import_litdata()
        _refuse_balance(order, "litdata")
        epoch = _SharedEpoch()
        dataset = litdata.StreamingDataset(
            self.dir,
            shuffle=order.shuffle,
            seed=order.seed,
            drop_last=False,
            transform=_LitdataSample(augmenter, epoch),
        )
        loader = litdata.StreamingDataLoader(
            dataset, batch_size=batch_size, **_common(workers, pin_memory)
        )

        def before_epoch(number: int) -> None:
            # StreamingDataLoader adds one to its epoch on each pass and seeds its shuffle with
            # (seed, epoch): set it so that our epoch e is its epoch e + 1 on every pass, also
            # when a pass was cut short (the training loop's first-batch checks).
            loader.current_epoch = number

        # litdata hands each worker whole batches; a subset (a carved val slice) is filtered
        # after batching, so batches are rebuilt to `batch_size`.
        return _StreamEpochs(
            loader, order, batch_size, epoch, keep=_subset(order, self.count), rebatch=True,
            pin_memory=pin_memory, before_epoch=before_epoch,
        )  # fmt: skip


@register_format
class LitdataPeer(_PeerFormat):
    name = "litdata"
    own_order = True
    summary = "peer: Lightning litdata chunks (optimize) + StreamingDataset/StreamingDataLoader"
    requires = ("litdata",)
    install = "litdata"
    options = {"chunk_mb": Option(64, "megabytes per litdata chunk", kind=int, minimum=1)}
    writer_class = LitdataWriter
    reader_class = LitdataReader
