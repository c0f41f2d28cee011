"""What every source shares: its options and `Source`, a dataset after them.

A source kind (CIFAR-10, an image folder, ...) only knows how to read its published layout into a
`RawDataset` (`raw.py`). `Source` then applies the options every kind accepts (drop/remap
classes, resplit, carve validation or test splits, limit) by selecting indices
(`selection.py`), so nothing is decoded that is not used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, create_model

from loadbench.errors import LoadbenchError
from loadbench.options import Option, fields
from loadbench.sources.raw import ArraySplit, ImageShape, OriginalSizes, RawDataset
from loadbench.sources.selection import (
    Selection,
    _as_list,
    apply_options,
    parse_fractions,
    parse_remap,
)


def _remap(value: Any) -> Any:
    if isinstance(value, str):
        return parse_remap(value)
    if isinstance(value, dict):
        return {str(k): _as_list(v) for k, v in value.items()}
    raise ValueError("must be 'new=old,old;new=old' or a mapping {new: [old, ...]}")


# Options every source accepts (in a spec string `kind:path?limit=100` or as keywords).
COMMON_OPTIONS = {
    "limit": Option(None, "first N images of every split (stratified)", kind=int, above=0),
    "remap": Option(
        None,
        "new classes from old: 'upper=0,2,3,4,6;trousers=1;shoes=5,7,9' or JSON",
        parse=_remap,
    ),
    "drop": Option(
        [], "classes to remove, by name or index: 'Bag' or '8,9'", parse=lambda v: _as_list(v)
    ),
    "resplit": Option(
        None,
        "pool every split, then split again: train,val,test shares of each class, e.g. 70,15,15",
        parse=parse_fractions,
    ),
    "test_ratio": Option(
        None,
        "carve a stratified test split: this share of the train split",
        kind=float,
        above=0,
        below=1,
    ),
    "val_ratio": Option(
        None,
        "carve a stratified val split: this share of train (after test_ratio's)",
        kind=float,
        above=0,
        below=1,
    ),
    "seed": Option(0, "seed of resplit, carved splits and generated data", kind=int),
}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


SourceOptions = create_model(
    "SourceOptions", __base__=_Options, __doc__="Options every source accepts.",
    **fields(COMMON_OPTIONS),
)  # fmt: skip


def options_model(name: str, own: dict[str, Option]) -> type[BaseModel]:
    """The pydantic model of a source kind's options: every source's, then its own."""
    if not own:
        return SourceOptions
    return create_model(f"{name}Options", __base__=SourceOptions, **fields(own))


class Source:
    """A dataset ready to convert: class names, splits, and uint8 images with int64 labels.

    Use `loadbench.load_source(spec)` to get one. `split(name)` returns the whole split in memory;
    `iter_batches(name, n)` streams it so that big datasets convert in bounded memory.
    """

    def __init__(
        self, kind: str, spec: str, raw: RawDataset, options: SourceOptions, identity: dict
    ):
        self.kind = kind
        self.spec = spec
        self.options = options
        self.identity = identity  # what makes two loads of this source the same data
        self.image_shape: ImageShape = raw.image_shape
        self.details = raw.details
        self.notes = list(raw.notes)
        self.classes, self._splits, notes = apply_options(raw, options)
        self.notes += notes

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def _get(self, split: str) -> Selection:
        try:
            return self._splits[split]
        except KeyError:
            raise LoadbenchError(
                f"source {self.spec} has no split {split!r}; it has {', '.join(self._splits)}"
            ) from None

    def count(self, split: str) -> int:
        return len(self._get(split).indices)

    def labels(self, split: str) -> np.ndarray:
        return self._get(split).labels

    def iter_batches(
        self, split: str, batch_size: int = 1024
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (images uint8 (n,H,W,C), labels int64 (n,)) in split order."""
        sel = self._get(split)
        for start in range(0, len(sel.indices), batch_size):
            idx = sel.indices[start : start + batch_size]
            yield sel.raw.load(idx), sel.labels[start : start + batch_size]

    def read(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images start..stop-1 of a split: (uint8 (n,H,W,C), int64 (n,)), the same pixels as
        `iter_batches` gives them."""
        sel = self._get(split)
        return sel.raw.load(sel.indices[start:stop]), sel.labels[start:stop]

    @property
    def decoded(self) -> bool:
        """Every split is already in memory, decoded: reading an image costs only a copy."""
        return all(isinstance(s.raw, ArraySplit) for s in self._splits.values())

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole split: (images uint8 (N,H,W,C), labels int64 (N,))."""
        n = self.count(name)
        images = np.empty((n, *self.image_shape), dtype=np.uint8)
        pos = 0
        for batch, _ in self.iter_batches(name):
            images[pos : pos + len(batch)] = batch
            pos += len(batch)
        return images, self.labels(name).copy()

    def in_memory(self, max_bytes: int | None = None, jobs: int = 1) -> Source:
        """This source with every split decoded once into memory, if it fits in `max_bytes`
        (default: a quarter of the available RAM, at most 4 GiB); else the source itself.

        Converting to several formats or verifying several stores then reads (or generates,
        or decodes) the source once instead of once per format. With `jobs` > 1, forked
        processes read batches at once into memory shared with this process.
        """
        if max_bytes is None:
            import psutil

            max_bytes = min(4 << 30, psutil.virtual_memory().available // 4)
        total = sum(self.count(s) for s in self.splits) * int(np.prod(self.image_shape))
        if total > max_bytes or self.decoded:
            return self
        import contextlib

        from loadbench import parallel, progress

        shared = jobs > 1 and parallel.available()
        arrays = {
            name: _empty_images((len(sel.indices), *self.image_shape), shared)
            for name, sel in self._splits.items()
        }
        reads = [
            _Read(name, start, min(start + 1024, len(sel.indices)))
            for name, sel in self._splits.items()
            for start in range(0, len(sel.indices), 1024)
        ]

        def read(batch: _Read, report=None) -> int:
            sel = self._splits[batch.split]
            arrays[batch.split][batch.start : batch.stop] = sel.raw.load(
                sel.indices[batch.start : batch.stop]
            )
            return batch.stop - batch.start

        # Forked before the progress bar starts its thread.
        with parallel.Workers(jobs, read) if shared else contextlib.nullcontext() as workers:
            if shared:
                done = workers.ordered(reads, lambda n: None, window=2 * jobs)
            else:
                done = ((batch, read(batch)) for batch in reads)
            images = sum(self.count(s) for s in self.splits)
            with progress.task(f"reading {self.spec}", images) as advance:
                for _, n in done:
                    advance(n)
        clone = copy.copy(self)
        clone._splits = {}
        for name, sel in self._splits.items():
            raw = ArraySplit(arrays[name], sel.labels)
            clone._splits[name] = Selection(raw, np.arange(len(sel.indices)), sel.labels)
        return clone

    def original_sizes(self, split: str) -> OriginalSizes | None:
        sel = self._get(split)
        return sel.raw.original_sizes(sel.indices)

    def drop_corrupt(self) -> int:
        """Remove images that cannot be decoded from every split; returns how many were removed."""
        from loadbench import progress

        removed = 0
        total = sum(len(sel.indices) for sel in self._splits.values())
        with progress.task("checking images", total) as advance:
            for name, sel in self._splits.items():
                bad = []
                for start in range(0, len(sel.indices), 256):
                    chunk = sel.indices[start : start + 256]
                    bad.extend(start + sel.raw.corrupt(chunk))
                    advance(len(chunk))
                if bad:
                    keep = np.setdiff1d(np.arange(len(sel.indices)), bad)
                    self._splits[name] = Selection(sel.raw, sel.indices[keep], sel.labels[keep])
                    removed += len(bad)
                    self.notes.append(f"{name}: skipped {len(bad)} corrupt image(s)")
        return removed

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for manifests: spec, identity, classes, counts."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "identity": self.identity,
            "options": self.options.model_dump(exclude_defaults=True),
            "image_shape": list(self.image_shape),
            "splits": {s: self.count(s) for s in self.splits},
            "notes": self.notes,
        }

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self.splits)
        h, w, c = self.image_shape
        return f"Source({self.spec!r}, {h}x{w}x{c}, {len(self.classes)} classes, {counts})"


@dataclass(frozen=True)
class _Read:
    """A batch of a split that `in_memory` reads."""

    split: str
    start: int
    stop: int

    def __str__(self) -> str:
        return f"reading {self.split} images {self.start}-{self.stop - 1}"


def _empty_images(shape: tuple[int, ...], shared: bool) -> np.ndarray:
    """uint8 images to fill; with `shared`, in memory that processes forked later write into."""
    if not shared or not int(np.prod(shape)):
        return np.empty(shape, dtype=np.uint8)
    import mmap

    return np.frombuffer(mmap.mmap(-1, int(np.prod(shape))), dtype=np.uint8).reshape(shape)
