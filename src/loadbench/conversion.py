"""Write a source into a store of one format, atomically, with content checksums.

The store is built under a temporary name beside its destination and renamed into place only
when complete, so an interrupted conversion never leaves a directory that `open_store` accepts.
A store that already exists with the same identity (source, format, dtype, options) is reused.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from loadbench import parallel, progress
from loadbench.errors import LoadbenchError
from loadbench.formats import DTYPES, SplitLayout, expand_names, get_format, to_stored
from loadbench.remote import is_url, join
from loadbench.sources import Source, load_source
from loadbench.store import (
    MANIFEST,
    SCHEMA_VERSION,
    Store,
    now_iso,
    open_store,
    read_manifest,
)


def checksum_block(image_shape: tuple[int, int, int]) -> int:
    """Images per checksum block (and per conversion batch): about 64 MiB of uint8 pixels."""
    pixels = int(np.prod(image_shape))
    block = max(1, min(1024, (64 << 20) // pixels))
    return 1 << (block.bit_length() - 1)  # a power of two, so chunk sizes divide it


class ContentHash:
    """SHA-256 of a split's images and labels, whole and per block of `block` images.

    Block hashes let `verify` say which images differ, not only that something does.
    """

    def __init__(self, block: int):
        self.block = block
        self.images = hashlib.sha256()
        self.labels = hashlib.sha256()
        self.blocks: list[str] = []
        self._block_images = hashlib.sha256()
        self._block_labels = hashlib.sha256()
        self._filled = 0

    def update(self, images: np.ndarray, labels: np.ndarray) -> None:
        pos = 0
        while pos < len(images):
            take = min(self.block - self._filled, len(images) - pos)
            pixels = _le_bytes(images[pos : pos + take])
            tags = _le_bytes(np.asarray(labels[pos : pos + take], dtype=np.int64))
            for hasher, data in (
                (self.images, pixels), (self._block_images, pixels),
                (self.labels, tags), (self._block_labels, tags),
            ):  # fmt: skip
                hasher.update(data)
            self._filled += take
            pos += take
            if self._filled == self.block:
                self._close_block()

    def _close_block(self) -> None:
        both = self._block_images.digest() + self._block_labels.digest()
        self.blocks.append(hashlib.sha256(both).hexdigest()[:16])
        self._block_images, self._block_labels = hashlib.sha256(), hashlib.sha256()
        self._filled = 0

    def finish(self) -> dict[str, Any]:
        if self._filled:
            self._close_block()
        return {
            "images_sha256": self.images.hexdigest(),
            "labels_sha256": self.labels.hexdigest(),
            "block_sha256": self.blocks,
        }


def _le_bytes(array: np.ndarray) -> memoryview:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(array).cast("B")


def store_identity(source: Source, format_name: str, dtype: str, options: dict) -> str:
    fmt = get_format(format_name)
    key = {
        "schema": SCHEMA_VERSION,
        "source": source.identity,
        "format": format_name,
        "format_version": fmt.version,
        "dtype": dtype,
        "options": options,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def store_name(format_name: str, dtype: str) -> str:
    """The directory name of a store under `--format all`: `npy-uint8`, `hdf5-float16`, ..."""
    return f"{format_name}-{dtype}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: str) -> None:
    parent, name = os.path.split(out)
    for partial in glob.glob(os.path.join(parent, f".{glob.escape(name)}.partial-*")):
        pid = partial.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _directory_size(root: str) -> tuple[dict[str, int], int, int]:
    files, total, allocated = {}, 0, 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            files[os.path.relpath(path, root)] = st.st_size
            total += st.st_size
            allocated += getattr(st, "st_blocks", 0) * 512
    return files, total, allocated


def convert(
    source: Source | str,
    format: str,
    out: str,
    dtype: str = "uint8",
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    jobs: int = 1,
    **options: Any,
) -> Store:
    """Write `source` into a new store of `format` at `out` and return it opened.

    If `out` already holds a store with the same source, format, dtype and options, it is
    reused (`store.skipped` is True). A different store there is an error unless `overwrite`.
    `out` may be an fsspec URL (`s3://bucket/prefix`): the store is written locally, then
    uploaded with its manifest last (see `upload.convert_to_url`).
    `jobs` processes write at once (0: one per CPU core); the store is the same as with one.
    """
    if isinstance(source, str):
        source = load_source(source)
    jobs = resolve_jobs(jobs)
    fmt = get_format(format)
    if missing := fmt.missing():
        raise LoadbenchError(missing)
    options = fmt.resolve_options(dtype, {k: v for k, v in options.items() if v is not None})
    identity = store_identity(source, format, dtype, options)
    if is_url(str(out)):
        from loadbench.upload import convert_to_url

        return convert_to_url(
            source, fmt, str(out), dtype, identity, overwrite=overwrite,
            storage_options=storage_options or {}, jobs=jobs, options=options,
        )  # fmt: skip
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(out):
        existing = _existing_identity(out)
        if existing == identity:
            store = open_store(out)
            store.skipped = True
            return store
        if not overwrite:
            what = "a different store" if existing else "something that is not a store"
            raise LoadbenchError(
                f"{out} already holds {what}; choose another --out or pass --overwrite"
            )
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(out)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = _write_store(source, fmt, tmp, dtype, options, identity, jobs)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(out)


def _existing_identity(out: str) -> str | None:
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        return None
    try:
        return read_manifest(out).identity
    except LoadbenchError:
        return None


def _replace(tmp: str, out: str) -> None:
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = f"{tmp}.old"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_store(
    source: Source, fmt, root: str, dtype: str, options: dict, identity: str, jobs: int = 1
) -> dict[str, Any]:
    started = time.perf_counter()
    # Time inside the format's writers, summed over processes: the conversion cost of the
    # format itself, whatever `jobs` was (total_time_s is the wall clock).
    writing_s = 0.0
    block = checksum_block(source.image_shape)
    splits: dict[str, Any] = {}
    layouts = [
        SplitLayout(
            root=root,
            split=split,
            count=source.count(split),
            image_shape=source.image_shape,
            dtype=dtype,
            options=options,
            classes=source.classes,
        )
        for split in source.splits
    ]
    mode = _parallel_mode(fmt, source, layouts, jobs)
    tasks = _tasks(mode, fmt, layouts, block, jobs) if mode else []
    job = _Job(source, fmt, {lay.split: lay for lay in layouts}, block, root, jobs)
    run = job.write if mode == "ranges" else job.read
    # Forked before the progress bar starts its thread.
    with parallel.Workers(jobs, run) if mode else contextlib.nullcontext() as workers:
        if mode == "ranges":  # what the writers of each split share, before any of them runs
            t0 = time.perf_counter()
            os.makedirs(job.scratch)
            for layout in layouts:
                fmt.writer_class.prepare(layout)
            writing_s += time.perf_counter() - t0
        total = sum(layout.count for layout in layouts)
        with progress.task(f"{source.spec} -> {fmt.name} ({dtype})", total) as advance:
            results = workers.ordered(tasks, advance, window=2 * jobs) if mode else iter(())
            for layout in layouts:
                split = layout.split
                done = itertools.islice(results, sum(t.split == split for t in tasks))
                content = ContentHash(block)
                if mode == "ranges":
                    extra, seconds = job.join(layout, done, content)
                else:
                    batches = (result for _, result in done) if mode else job.batches(split)
                    extra, seconds = _write_split(fmt, layout, batches, content, advance)
                writing_s += seconds
                labels = source.labels(split)
                splits[split] = {
                    "count": source.count(split),
                    "label_counts": np.bincount(labels, minlength=len(source.classes)).tolist(),
                    **content.finish(),
                    **extra,
                }
    if mode == "ranges":
        os.rmdir(job.scratch)
    t0 = time.perf_counter()
    fmt.finalize(root, options)
    writing_s += time.perf_counter() - t0
    files, total_bytes, allocated = _directory_size(root)
    if not fmt.tracks_every_file:
        files = {rel: size for rel, size in files.items() if rel.endswith(".npy")}
    from loadbench import __version__

    return {
        "loadbench_store": SCHEMA_VERSION,
        "format": fmt.name,
        "format_version": fmt.version,
        "dtype": dtype,
        "image_shape": list(source.image_shape),
        "classes": source.classes,
        "splits": splits,
        "options": options,
        "lossy": fmt.is_lossy(options),
        "checksum_block": block,
        "identity": identity,
        "source": source.describe(),
        "files": files,
        "bytes": total_bytes,
        "bytes_allocated": allocated,
        "convert_time_s": round(writing_s, 3),
        "total_time_s": round(time.perf_counter() - started, 3),
        "created": now_iso(),
        "loadbench_version": __version__,
    }


def _write_split(fmt, layout: SplitLayout, batches, content: ContentHash, advance):
    """A split written by one writer in this process from (stored images, labels) batches;
    returns its manifest extras and the seconds spent in the writer."""
    t0 = time.perf_counter()
    fmt.writer_class.prepare(layout)
    writer = fmt.writer(layout)
    seconds = time.perf_counter() - t0
    for batch, labels in batches:
        t0 = time.perf_counter()
        stored = writer.write(batch, labels)
        seconds += time.perf_counter() - t0
        content.update(stored, labels)
        advance(len(batch))
    t0 = time.perf_counter()
    extra = fmt.writer_class.join(layout, [writer.close()])
    return extra, seconds + time.perf_counter() - t0


def resolve_jobs(jobs: int) -> int:
    """`--jobs`: a number of processes, 0 for one per CPU core."""
    if jobs < 0:
        raise LoadbenchError(
            f"--jobs {jobs}: give a number of processes (1 or more), or 0 for one per CPU core"
        )
    return jobs or os.cpu_count() or 1


def _parallel_mode(fmt, source: Source, layouts: list[SplitLayout], jobs: int) -> str | None:
    """How `jobs` processes share a conversion: "ranges" (workers write ranges of whole units of
    a split, each with a writer of its own), "read" (one writer here, workers read and decode
    the source for it), or None (this process alone)."""
    if jobs == 1:
        return None
    if not parallel.available():
        progress.note(f"--jobs {jobs}: processes cannot be forked here; converting with one")
        return None
    if all(fmt.writer_class.range_unit(layout) for layout in layouts):
        return "ranges"
    if not source.decoded:
        return "read"
    progress.note(
        f"--jobs {jobs}: {fmt.name} writes each split with one writer and the source is in "
        "memory already: converting with one process"
    )
    return None


@dataclass(frozen=True)
class _Task:
    """Images start..stop-1 of a split, for a worker to write (or to read)."""

    number: int
    split: str
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.split} images {self.start}-{self.stop - 1}"


def _tasks(mode: str, fmt, layouts: list[SplitLayout], block: int, jobs: int) -> list[_Task]:
    """The ranges workers take one after another, in split order. Written ranges are whole
    units of the format and about four per worker (at most a checksum block), so that a worker
    that finishes early takes the next; read ranges are the batches a single writer gets."""
    tasks: list[_Task] = []
    for layout in layouts:
        count = layout.count
        if mode == "ranges":
            unit = fmt.writer_class.range_unit(layout)
            step = unit * max(1, min(block, -(-count // (4 * jobs))) // unit)
            bounds = [(a, min(a + step, count)) for a in range(0, count, step)] or [(0, 0)]
        else:
            bounds = [(a, min(a + block, count)) for a in range(0, count, block)]
        tasks += [_Task(len(tasks) + k, layout.split, a, b) for k, (a, b) in enumerate(bounds)]
    return tasks


@dataclass
class _Job:
    """What the workers of a conversion run. They inherit it through fork: the source is
    never pickled. A worker that writes a range puts the stored pixels (what a reader will
    decode) in a scratch file, and the parent hashes them in split order, as one writer would;
    at most `2 * jobs` ranges wait there at a time."""

    source: Source
    fmt: Any
    layouts: dict[str, SplitLayout]
    block: int
    root: str
    jobs: int

    @property
    def scratch(self) -> str:
        return os.path.join(self.root, ".parallel-scratch")

    def _scratch_file(self, task: _Task) -> str:
        return os.path.join(self.scratch, f"{task.number}.raw")

    def batches(self, split: str):
        """(stored images, labels) batches of a split, read in this process."""
        dtype = self.layouts[split].dtype
        for images, labels in self.source.iter_batches(split, self.block):
            yield to_stored(images, dtype), labels

    def read(self, task: _Task, report: parallel.Report) -> tuple[np.ndarray, np.ndarray]:
        """In a worker: a batch of the source, decoded and in the storage dtype."""
        images, labels = self.source.read(task.split, task.start, task.stop)
        return to_stored(images, self.layouts[task.split].dtype), labels

    def write(self, task: _Task, report: parallel.Report) -> dict[str, Any]:
        """In a worker: a range written by a writer of its own; its `close()` result and the
        seconds spent in the writer."""
        threads = max(1, (os.cpu_count() or 1) // self.jobs)  # this worker's share of the cores
        layout = self.layouts[task.split]
        layout = replace(layout, start=task.start, stop=task.stop, threads=threads)
        t0 = time.perf_counter()
        writer = self.fmt.writer(layout)
        seconds = time.perf_counter() - t0
        with open(self._scratch_file(task), "wb") as scratch:
            for start in range(task.start, task.stop, self.block):
                stop = min(start + self.block, task.stop)
                images, labels = self.source.read(task.split, start, stop)
                batch = to_stored(images, layout.dtype)
                t0 = time.perf_counter()
                stored = writer.write(batch, labels)
                seconds += time.perf_counter() - t0
                scratch.write(np.ascontiguousarray(stored, dtype=DTYPES[layout.dtype]).data)
                report(len(batch))
            t0 = time.perf_counter()
            part = writer.close()
            seconds += time.perf_counter() - t0
        return {"part": part, "writing_s": seconds}

    def join(self, layout: SplitLayout, done, content: ContentHash) -> tuple[dict[str, Any], float]:
        """In the parent: a split's written ranges, in order, hashed from their scratch files
        and joined into its manifest extras; and the seconds spent in writers."""
        parts, seconds = [], 0.0
        labels = self.source.labels(layout.split)
        shape, dtype = layout.image_shape, DTYPES[layout.dtype]
        for task, result in done:
            with open(self._scratch_file(task), "rb") as scratch:
                for start in range(task.start, task.stop, self.block):
                    n = min(self.block, task.stop - start)
                    stored = np.fromfile(scratch, dtype=dtype, count=n * int(np.prod(shape)))
                    content.update(stored.reshape(n, *shape), labels[start : start + n])
            os.remove(self._scratch_file(task))
            parts.append(result["part"])
            seconds += result["writing_s"]
        t0 = time.perf_counter()
        extra = self.fmt.writer_class.join(layout, parts)
        return extra, seconds + time.perf_counter() - t0


@dataclass
class Converted:
    format: str
    path: str
    store: Store | None
    note: str = ""  # why a format was skipped, or that an existing store was reused


def resolve_formats(spec: str) -> list[str]:
    """`all` (loadbench's formats), `peers` (the peer loaders), one name, or a comma-separated
    list of these -> format names."""
    return expand_names([n.strip() for n in spec.split(",") if n.strip()])


def convert_many(
    source: Source | str,
    formats: str | list[str],
    out_dir: str,
    dtype: str = "uint8",
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    jobs: int = 1,
    **options: Any,
) -> list[Converted]:
    """One store per format under `out_dir/<format>-<dtype>`; formats that cannot hold the
    dtype are skipped with a note. An option that none of the formats takes is an error.

    Formats are converted one after another, each with `jobs` processes: the costly formats
    (image files, encoded records, compressed chunks) are the ones that write in parallel.
    """
    jobs = resolve_jobs(jobs)
    if isinstance(source, str):
        source = load_source(source)
    names = resolve_formats(formats) if isinstance(formats, str) else list(formats)
    given = {k: v for k, v in options.items() if v is not None}
    fmts = [get_format(n) for n in names]
    unused = sorted(k for k in given if not any(k in f.options for f in fmts))
    if unused:
        raise LoadbenchError(f"option {', '.join(unused)} applies to none of {', '.join(names)}")
    if len(fmts) > 1:
        # Read or decode the source once, not once per format (with `jobs` processes).
        source = source.in_memory(jobs=jobs)
    results = []
    for fmt in fmts:
        if dtype not in fmt.dtypes:
            note = f"skipped: {fmt.name} stores {'/'.join(fmt.dtypes)} only"
            results.append(Converted(fmt.name, "", None, note))
            continue
        path = join(out_dir, store_name(fmt.name, dtype))
        own = {k: v for k, v in given.items() if k in fmt.options}
        store = convert(
            source, fmt.name, path, dtype, overwrite=overwrite,
            storage_options=storage_options, jobs=jobs, **own,
        )  # fmt: skip
        note = "exists (same source and settings): reused" if store.skipped else ""
        results.append(Converted(fmt.name, path, store, note))
    return results
