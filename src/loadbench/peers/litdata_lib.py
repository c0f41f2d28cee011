"""`litdata`: Lightning's `litdata.optimize` chunks read by `StreamingDataset` +
`StreamingDataLoader`, as litdata's README shows: https://github.com/Lightning-AI/litData
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import struct

import numpy as np

from loadbench.errors import reserve
from loadbench.formats.base import Option, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.peers._base import PeerFormat, loader_args, read_dict_items, refuse_balance, subset


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
        reserve([self.scratch], "converting into")  # a full disk: an error, not a SIGBUS
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


# What litdata raises for a damaged chunk or index.json: its own checks of a chunk's header
# (RuntimeError), a chunk it waits for and never finds (ChunkWaitTimeoutError, an OSError),
# index.json without the keys and types it reads (KeyError, TypeError, IndexError), and its
# deserializers' errors on damaged item bytes (struct.error, numpy's ValueError, KeyError for an
# unknown dtype code).
LITDATA_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, struct.error)
# index.json's settings as `LitdataWriter` makes them: items deserialized from plain bytes (no
# pickle, no decompression, no decryption), read by the loader it names.
INDEX_CONFIG = {
    "data_format": ["int", "numpy", "int"], "item_loader": "PyTreeLoader", "compression": None,
    "compression_level": None, "encryption": None, "ipc_compression": None, "format": None,
}  # fmt: skip


class LitdataReader(SplitReader):
    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        self.dir = os.path.join(root, split)
        self.file_sizes = manifest.files

    def _open(self):
        litdata = _import_litdata()
        rel = f"{self.split}/index.json"
        index = self._read_json(rel)
        if problem := _index_problem(index, self.split, self.count, self.file_sizes):
            raise self._damaged(rel, problem)
        labels_rel = f"{self.split}/labels.npy"
        labels = self._read_npy(labels_rel)
        if labels.shape != (self.count,) or labels.dtype != np.int64:
            raise self._damaged(
                labels_rel, f"{labels.shape} {labels.dtype}, not {self.count} int64"
            )
        try:
            dataset = litdata.StreamingDataset(self.dir)
            items = len(dataset)  # reads index.json
        except LITDATA_ERRORS as e:
            raise self._damaged(rel, e) from None
        if items != self.count:
            raise self._damaged(rel, f"{items} items")
        chunks = index["chunks"]  # for errors: the chunk file of an item
        ends = np.cumsum([chunk["chunk_size"] for chunk in chunks])
        names = [f"{self.split}/{chunk['filename']}" for chunk in chunks]
        return {"dataset": dataset, "labels": labels, "chunk_ends": ends, "chunk_names": names}

    def labels(self) -> np.ndarray:
        return self.handle["labels"].astype(np.int64)

    def read_items(self, indices):
        dataset = self.handle["dataset"]
        return read_dict_items(self, dataset, indices, LITDATA_ERRORS, self._where)

    def _where(self, index: int) -> str:
        """The chunk file that holds item `index`, for errors."""
        h = self.handle
        chunk = int(np.searchsorted(h["chunk_ends"], index, side="right"))
        return f"{h['chunk_names'][chunk]} (item {index})"

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


def _index_problem(index, split: str, count: int, sizes: dict[str, int]) -> str | None:
    """What in a split's index.json is not as `LitdataWriter` wrote it: litdata would read other
    files than the store's chunks (or wait for them), unpickle, decompress, or hold other
    counts."""
    chunks = index.get("chunks") if isinstance(index, dict) else None
    config = index.get("config") if isinstance(index, dict) else None
    if not isinstance(chunks, list) or not isinstance(config, dict):
        return "no chunks and config"
    for key, want in INDEX_CONFIG.items():
        if config.get(key) != want:
            return f"config {key} is {config.get(key)!r:.40}, not {want!r}"
    items = 0
    for chunk in chunks:
        name = chunk.get("filename") if isinstance(chunk, dict) else None
        rel = f"{split}/{name}"
        if not isinstance(name, str) or "/" in name or rel not in sizes:
            return f"a chunk {name!r:.40} the store does not list"
        size = chunk.get("chunk_size")
        if type(size) is not int or size < 0 or chunk.get("chunk_bytes") != sizes[rel]:
            return f"chunk {name} of {size!r:.20} items in {chunk.get('chunk_bytes')!r:.20} bytes"
        items += size
    return None if items == count else f"{items} items in its chunks, {count} in the split"
