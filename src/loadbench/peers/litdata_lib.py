"""`litdata`: Lightning's `litdata.optimize` chunks read by `StreamingDataset` +
`StreamingDataLoader`, as litdata's README shows: https://github.com/Lightning-AI/litData
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil

import numpy as np

from loadbench.formats.base import Option, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.peers._base import PeerFormat, loader_args, refuse_balance, subset


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

    def __init__(self, sample):
        self.sample = sample

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
        from loadbench.peers._pipeline import Sample, SharedEpoch, StreamEpochs

        litdata = _import_litdata()
        refuse_balance(order, "litdata")
        epoch = SharedEpoch()
        dataset = litdata.StreamingDataset(
            self.dir,
            shuffle=order.shuffle,
            seed=order.seed,
            drop_last=False,
            transform=_LitdataSample(Sample(augmenter, epoch)),
        )
        loader = litdata.StreamingDataLoader(
            dataset, batch_size=batch_size, **loader_args(workers, pin_memory)
        )

        def before_epoch(number: int) -> None:
            # StreamingDataLoader adds one to its epoch on each pass and seeds its shuffle with
            # (seed, epoch): set it so that our epoch e is its epoch e + 1 on every pass, also
            # when a pass was cut short (the training loop's first-batch checks).
            loader.current_epoch = number

        # litdata hands each worker whole batches; a subset (a carved val slice) is filtered
        # after batching, so batches are rebuilt to `batch_size`.
        return StreamEpochs(
            loader, order, batch_size, epoch, dataloader=loader, keep=subset(order, self.count),
            rebatch=True, pin_memory=pin_memory, before_epoch=before_epoch,
        )  # fmt: skip


@register_format
class LitdataPeer(PeerFormat):
    name = "litdata"
    own_order = True
    summary = "peer: Lightning litdata chunks (optimize) + StreamingDataset/StreamingDataLoader"
    requires = ("litdata",)
    install = "litdata"
    options = {"chunk_mb": Option(64, "megabytes per litdata chunk", kind=int, minimum=1)}
    writer_class = LitdataWriter
    reader_class = LitdataReader
