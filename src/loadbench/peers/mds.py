"""`mds`: MosaicML Streaming's MDS shards, written with `streaming.MDSWriter` and read by
`StreamingDataset(local|remote, shuffle, shuffle_seed, batch_size)` + `StreamingDataLoader`, as
Streaming's Quick Start shows (the batch size given to both):
https://docs.mosaicml.com/projects/streaming/en/stable/getting_started/quick_start.html
The library is `streaming-community`, the maintained fork of `mosaicml-streaming` (same import).

Streaming keeps a StreamingDataset's state outside the object: shared memory named by a prefix
that it registers per dataset, filelocks in the temp folder, and, when it downloads from a
remote, a local folder that no other live dataset may use ("Reused local directory"). So:
- a store on object storage is read through a local folder of each dataset's own, under the
  store's `cache_dir` when it has one, else the temp folder;
- a dataset that loadbench is done with gives back its shared memory and filelocks (Streaming
  unlinks the memory only at interpreter exit, 13 file descriptors a dataset until then,
  mosaicml/streaming#457, and never removes the filelocks, whose prefix then stays taken);
- construction is tried again when another process registered the same prefix at the same
  moment (FileExistsError, mosaicml/streaming#884), which concurrent test processes meet.
`clean_stale_shared_memory()` is never called: it would unlink other live datasets' memory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
import weakref

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats import codecs
from loadbench.formats.base import Option, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.formats.records import RecordFormat, encoding_options
from loadbench.peers._base import (
    PeerFormat,
    epoch_seed,
    loader_args,
    read_dict_items,
    refuse_balance,
    subset,
)
from loadbench.remote import join

COLUMNS = ("image", "index", "label")  # MDS keeps columns in sorted order
# What Streaming raises for a damaged shard (its readers index bytes with numpy, decode with
# PIL) or a shard it cannot find or fetch (RuntimeError after its retries).
MDS_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, EOFError)


def _import_streaming():
    import streaming

    return streaming


def _image_encoding(encoding: str, shape) -> str:
    """The MDS encoding of the image column: a fixed-shape uint8 array (no per-sample header),
    or PNG/JPEG bytes that Streaming decodes with PIL."""
    return f"ndarray:uint8:{','.join(map(str, shape))}" if encoding == "ndarray" else encoding


class MdsWriter(SplitWriter):
    """One `MDSWriter` per split, samples in index order ({"image", "index", "label"}), shards
    of `shard_mb` (its `size_limit`); labels also in `labels.npy` beside the shards."""

    def __init__(self, layout: SplitLayout):
        streaming = _import_streaming()
        self.layout, self.encoding = layout, layout.options["encoding"]
        self.dir = os.path.join(layout.root, layout.split)
        columns = {"image": _image_encoding(self.encoding, layout.image_shape), "index": "int",
                   "label": "int"}  # fmt: skip
        self.writer = streaming.MDSWriter(
            out=self.dir,
            columns=columns,
            size_limit=max(1, int(layout.options["shard_mb"] * (1 << 20))),
        )
        self.labels = np.empty(layout.count, dtype=np.int64)
        self.pos = 0

    def write(self, images, labels):
        stored = images if self.encoding == "ndarray" else np.empty_like(images)
        for k in range(len(images)):
            image = images[k]
            if self.encoding != "ndarray":
                # Encoded with loadbench's options (MDSWriter writes bytes as given), the bytes
                # files-jpeg/png store; Streaming's own encoder has no quality (75, 4:2:0).
                image = codecs.encode(images[k], self.encoding, self.layout.options)
                stored[k] = codecs.decode_pil(image, images.shape[3])  # as Streaming decodes
            self.writer.write({"image": image, "index": self.pos + k, "label": int(labels[k])})
        self.labels[self.pos : self.pos + len(images)] = labels
        self.pos += len(images)
        return stored

    def close(self):
        self.writer.finish()
        # MDS has no column access: labels() would otherwise decode every image.
        np.save(os.path.join(self.dir, "labels.npy"), self.labels)
        return {}

    def abort(self):
        self.writer.cancel_future_jobs()


class _Dataset:
    """A StreamingDataset and what gives back what it holds outside Python (`release`)."""

    def __init__(self, streaming, scratch: str | None, **kwargs):
        self.dataset = _new_dataset(streaming, **kwargs)
        barrier = getattr(self.dataset, "_shared_barrier", None)
        paths = [getattr(barrier, "filelock_path", None),
                 getattr(self.dataset, "_cache_filelock_path", None)]  # fmt: skip
        # Also run when the dataset is collected unreleased, or at exit (a run's subprocess):
        # Streaming unlinks its memory then, but leaves the filelocks, which burn the prefix.
        self.give_back = weakref.finalize(
            self.dataset, _give_back, list(_shared_memories(self.dataset)),
            [path for path in paths if path], scratch, os.getpid(),
        )  # fmt: skip

    def release(self) -> None:
        """Stop an unfinished epoch's download threads (they use the memory), give back."""
        iterator = getattr(self.dataset, "_iterator", None)
        if iterator is not None and getattr(self.dataset, "_thread_pid", None) == os.getpid():
            iterator.exit()
        self.give_back()


def _new_dataset(streaming, **kwargs):
    """`StreamingDataset(**kwargs)`, made again when another process registered the shared-memory
    prefix it picked at the same moment (its creation then fails with FileExistsError)."""
    for attempt in range(4):
        try:
            return streaming.StreamingDataset(**kwargs)
        except FileExistsError:
            time.sleep(0.02 * (attempt + 1))
    return streaming.StreamingDataset(**kwargs)


def _shared_memories(dataset):
    """Streaming's SharedMemory objects of a dataset (its own, and those of its shared arrays,
    scalars and barrier)."""
    for value in vars(dataset).values():
        for name in ("_arr", "arr", "shm"):
            if hasattr(value, "created_shms"):
                break
            value = getattr(value, name, value)
        if hasattr(value, "created_shms"):
            yield value


def _give_back(memories, filelocks: list[str], scratch: str | None, pid: int) -> None:
    """Unlink a dataset's shared memory (and drop its exit handler), remove its filelocks and
    its download folder: its prefix is then free for the next dataset. Only in the process that
    made it: a forked worker's copy must not unlink its parent's memory."""
    if os.getpid() != pid:
        return
    for memory in memories:
        with contextlib.suppress(Exception):  # BufferError if a view of it is still alive
            memory.cleanup()
            atexit.unregister(memory.cleanup)
    for path in filelocks:
        with contextlib.suppress(OSError):
            os.remove(path)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


class _Collate:
    """StreamingDataLoader `collate_fn`: MDS samples -> (images, labels, indices), each image
    through `Sample` (augmentation seeded by seed, epoch, store index) in the worker."""

    def __init__(self, sample):
        self.sample = sample

    def __call__(self, items):
        from loadbench.peers._pipeline import collate

        return collate([self.sample(i["image"], i["label"], i["index"]) for i in items])


class MdsReader(SplitReader):
    """Random access through `StreamingDataset[i]`, labels from `labels.npy`; `loader` is
    Streaming's own pipeline."""

    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        self.file_sizes = manifest.files

    def _stream(self) -> tuple[dict, str | None]:
        """StreamingDataset's `local`/`remote` for this split, and the download folder made for
        it (None for a local store, which Streaming reads in place)."""
        if not self.files.remote:
            return {"local": os.path.join(self.root, self.split)}, None
        endpoint = self.files.options.get("endpoint_url")
        if endpoint:  # Streaming's S3 client reads its endpoint from here only
            os.environ["S3_ENDPOINT_URL"] = endpoint
        parent = self.files.cache_root if self.files.cached else None
        if parent:
            os.makedirs(parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f"mds-{self.split}-", dir=parent)
        return {"remote": join(self.files.root, self.split), "local": scratch}, scratch

    def _checked_labels(self) -> np.ndarray:
        """The split's labels, once its index.json is found as `MdsWriter` wrote it (before
        Streaming reads it)."""
        rel = f"{self.split}/index.json"
        want = _image_encoding(self.options["encoding"], self.image_shape)
        index = self._read_json(rel)
        if problem := _index_problem(index, self.split, self.count, self.file_sizes, want):
            raise self._damaged(rel, problem)
        rel = f"{self.split}/labels.npy"
        labels = self._read_npy(rel)
        if labels.shape != (self.count,) or labels.dtype != np.int64:
            raise self._damaged(rel, f"{labels.shape} {labels.dtype}, not {self.count} int64")
        return labels

    def _open(self):
        streaming = _import_streaming()
        labels = self._checked_labels()
        stream, scratch = self._stream()
        try:
            made = _Dataset(streaming, scratch, **stream)
        except MDS_ERRORS as e:
            shutil.rmtree(scratch or "", ignore_errors=True)
            raise self._damaged(f"{self.split}/index.json", e) from None
        return {"dataset": made.dataset, "made": made, "labels": labels}

    def labels(self) -> np.ndarray:
        return self.handle["labels"].astype(np.int64)

    def read_items(self, indices):
        dataset = self.handle["dataset"]
        where = lambda index: self._where(dataset, index)  # noqa: E731
        return read_dict_items(self, dataset, indices, MDS_ERRORS, where)

    def _where(self, dataset, index: int) -> str:
        """The shard file that holds item `index`, for errors."""
        shard, _ = dataset.spanner[int(index)]
        return f"{self.split}/{dataset.shards[shard].file_pairs[0][0].basename} (item {index})"

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle["made"].release()  # nothing in a process that did not make it

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._pipeline import Sample, SharedEpoch, StreamEpochs

        streaming = _import_streaming()
        refuse_balance(order, "mds")
        self._checked_labels()
        stream, scratch = self._stream()
        # Streaming seeds an epoch's shuffle with shuffle_seed + epoch, and counts epochs in
        # shared memory that `before_epoch` sets: epoch e of loadbench is its epoch e, shuffled
        # with epoch_seed(seed, e).
        made = _Dataset(
            streaming, scratch, **stream, shuffle=order.shuffle,
            shuffle_seed=epoch_seed(order.seed, 0), batch_size=batch_size,
        )  # fmt: skip
        dataset = made.dataset
        epoch = SharedEpoch()
        loader = streaming.StreamingDataLoader(
            dataset, batch_size=batch_size, collate_fn=_Collate(Sample(augmenter, epoch)),
            **loader_args(workers, pin_memory),
        )  # fmt: skip

        def before_epoch(number: int) -> None:
            dataset.next_epoch = number  # persistent workers read it from shared memory

        # Workers hand over whole batches of their own part of the epoch, the last one partial;
        # a subset (a carved val slice) is filtered after batching: batches are rebuilt.
        epochs = StreamEpochs(
            loader, order, batch_size, epoch, dataloader=loader, keep=subset(order, self.count),
            rebatch=True, pin_memory=pin_memory, before_epoch=before_epoch,
        )  # fmt: skip
        return _MdsEpochs(epochs, made)


class _MdsEpochs:
    """The `StreamEpochs` of a loader, which, once closed, also gives back its dataset's shared
    memory, filelocks and download folder."""

    def __init__(self, epochs, made: _Dataset):
        self.epochs, self.made = epochs, made

    def __len__(self) -> int:
        return len(self.epochs)

    def __iter__(self):
        yield from self.epochs  # a generator: it keeps this object (and its dataset) alive

    def close(self) -> None:
        self.epochs.close()  # stops the workers first: they use the memory too
        self.made.release()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the contextlib module may be gone.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


@register_format
class MdsPeer(PeerFormat, RecordFormat):
    name = "mds"
    own_order = True
    summary = "peer: MosaicML Streaming MDS shards (MDSWriter) + StreamingDataset/DataLoader"
    requires = ("streaming",)
    install = "streaming-community"
    # Streaming downloads an s3:// store's shards itself (`MdsReader._stream`); open_store and
    # convert still refuse peers on object storage unless they honour this.
    reads_remote = True
    raw_encoding = "ndarray"
    options = {
        **encoding_options("ndarray"),
        # Streaming's default size_limit (1 << 26); MDS offsets are uint32, so under 4 GiB.
        "shard_mb": Option(
            64.0, "megabytes per MDS shard (its size_limit)", kind=float, above=0, below=4096
        ),  # fmt: skip
    }
    writer_class = MdsWriter
    reader_class = MdsReader

    def check(self, dtype: str, options: dict) -> None:
        super().check(dtype, options)
        if not 0 < options["shard_mb"] < 4096:
            raise LoadbenchError(f"mds option shard_mb={options['shard_mb']} must be in (0, 4096)")


# index.json's settings per shard as `MdsWriter` writes them: MDS, no compression (Streaming
# would decompress into the store's folder), no hashes, the three columns.
SHARD_CONFIG = {"format": "mds", "version": 2, "compression": None, "hashes": [],
                "zip_data": None, "column_names": list(COLUMNS)}  # fmt: skip


def _index_problem(index, split: str, count: int, sizes: dict[str, int], image: str) -> str | None:
    """What in a split's index.json is not as `MdsWriter` wrote it: Streaming would read other
    files than the store's shards, unpickle (`pkl` columns), decompress, or hold other counts."""
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(index, dict) or index.get("version") != 2 or not isinstance(shards, list):
        return "no version 2 shards"
    items = 0
    for shard in shards:
        if not isinstance(shard, dict):
            return "a shard that is no object"
        for key, want in {**SHARD_CONFIG, "column_encodings": [image, "int", "int"]}.items():
            if shard.get(key) != want:
                return f"shard {key} is {shard.get(key)!r:.40}, not {want!r}"
        raw = shard.get("raw_data") if isinstance(shard.get("raw_data"), dict) else {}
        name, samples = raw.get("basename"), shard.get("samples")
        rel = f"{split}/{name}"
        if not isinstance(name, str) or "/" in name or rel not in sizes:
            return f"a shard {name!r:.40} the store does not list"
        if type(samples) is not int or samples < 0 or raw.get("bytes") != sizes[rel]:
            return f"shard {name} of {samples!r:.20} items in {raw.get('bytes')!r:.20} bytes"
        items += samples
    return None if items == count else f"{items} items in its shards, {count} in the split"
