"""Writing a source into a store's directory: every split through the format's writers (in this
process, or in forked workers with `jobs` > 1), checksums of what a reader will decode, and the
manifest that describes the result.

With `jobs` > 1, a writer class whose `range_unit(layout)` is not None (files, npy/tensor, zarr
chunks, webdataset/tfrecord shards) lets workers write ranges of whole units, each with a writer
of its own (`prepare` once, `close()` per range, `join` of the ranges' results in the parent).
Workers hand their stored pixels back through scratch files, hashed by the parent in split
order, so the manifest is the one a single writer makes. One-writer formats (hdf5, lmdb, some
peers) keep one writer and let the workers read the source, unless it is already in memory.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from loadbench import parallel, progress
from loadbench.checksums import ContentHash, checksum_block
from loadbench.formats import DTYPES, Format, SplitLayout, to_stored
from loadbench.manifest import MANIFEST_SCHEMA, Manifest
from loadbench.sources import Source
from loadbench.util import now_iso
from loadbench.version import __version__


def write_store(source: Source, fmt: Format, root: str, dtype: str, options: dict,
                identity: str, jobs: int = 1) -> Manifest:  # fmt: skip
    """Every split of `source` into `root` (an empty directory); returns the manifest to
    write there."""
    started = time.perf_counter()
    block = checksum_block(source.image_shape)
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
    job = _Job(source, fmt, {lay.split: lay for lay in layouts}, block, root, jobs)
    run = job.write if mode == "ranges" else job.read
    workers = parallel.Workers(jobs, run) if mode else contextlib.nullcontext()
    with workers:  # forked before the progress bar starts its thread
        what = f"{source.spec} -> {fmt.name} ({dtype})"
        splits, writing_s = _write_splits(job, layouts, mode, workers, what)
    t0 = time.perf_counter()
    fmt.finalize(root, options)
    writing_s += time.perf_counter() - t0
    files, total_bytes, allocated = _directory_size(root)
    if not fmt.tracks_every_file:
        files = {rel: size for rel, size in files.items() if rel.endswith(".npy")}
    return Manifest(
        loadbench_store=MANIFEST_SCHEMA, format=fmt.name, format_version=fmt.version,
        dtype=dtype, image_shape=source.image_shape, classes=source.classes, splits=splits,
        options=options, lossy=fmt.is_lossy(options), checksum_block=block, identity=identity,
        source=source.describe(), files=files, bytes=total_bytes, bytes_allocated=allocated,
        # Time inside the format's writers, summed over processes: the conversion cost of the
        # format itself, whatever `jobs` was (total_time_s is the wall clock).
        convert_time_s=round(writing_s, 3),
        total_time_s=round(time.perf_counter() - started, 3),
        created=now_iso(), loadbench_version=__version__,
    )  # fmt: skip


def _write_splits(job: _Job, layouts: list[SplitLayout], mode: str | None, workers, what: str):
    """Each split written (by `workers` when `mode` says so): the splits' manifest entries and
    the seconds spent in the format's writers."""
    source, fmt, writing_s = job.source, job.fmt, 0.0
    tasks = _tasks(mode, fmt, layouts, job.block, job.jobs) if mode else []
    if mode == "ranges":  # what the writers of each split share, before any of them runs
        t0 = time.perf_counter()
        os.makedirs(job.scratch)
        for layout in layouts:
            fmt.writer_class.prepare(layout)
        writing_s += time.perf_counter() - t0
    splits: dict[str, Any] = {}
    total = sum(layout.count for layout in layouts)
    with progress.task(what, total) as advance:
        results = workers.ordered(tasks, advance, window=2 * job.jobs) if mode else iter(())
        for layout in layouts:
            split = layout.split
            done = itertools.islice(results, sum(t.split == split for t in tasks))
            content = ContentHash(job.block)
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
    return splits, writing_s


def _write_split(fmt, layout: SplitLayout, batches, content: ContentHash, advance):
    """A split written by one writer in this process from (stored images, labels) batches;
    returns its manifest extras and the seconds spent in the writer."""
    t0 = time.perf_counter()
    fmt.writer_class.prepare(layout)
    writer = fmt.writer(layout)
    seconds = time.perf_counter() - t0
    with _aborted_on_error(writer):
        for batch, labels in batches:
            t0 = time.perf_counter()
            stored = writer.write(batch, labels)
            seconds += time.perf_counter() - t0
            content.update(stored, labels)
            advance(len(batch))
        t0 = time.perf_counter()
        part = writer.close()
    extra = fmt.writer_class.join(layout, [part])
    return extra, seconds + time.perf_counter() - t0


@contextlib.contextmanager
def _aborted_on_error(writer):
    """`writer.abort()` if the block fails, so that its library holds no half-written file
    open while the error travels up (and the partial store is removed)."""
    try:
        yield
    except BaseException:
        writer.abort()
        raise


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
        with open(self._scratch_file(task), "wb") as scratch, _aborted_on_error(writer):
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
