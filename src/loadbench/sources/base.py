"""What every source shares: raw splits, options, class remapping, carved splits and limits.

A source kind (CIFAR-10, an image folder, ...) only knows how to read its published layout into
`RawDataset`: class names, one `RawSplit` per split (all labels up front, images decoded on
demand by index). `Source` then applies the options every kind accepts (drop/remap classes, carve
validation or test splits, limit) by selecting indices, so nothing is decoded that is not used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, create_model

from loadbench.errors import LoadbenchError
from loadbench.options import Option, fields

# Images are handed around as uint8 arrays of shape (N, H, W, C): the layout of every source's
# published files and of PIL, so nothing is transposed until a batch becomes a tensor.
ImageShape = tuple[int, int, int]


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
    "val_ratio": Option(
        None, "carve a stratified val split from train", kind=float, above=0, below=1
    ),
    "test_ratio": Option(
        None, "carve a stratified test split from train", kind=float, above=0, below=1
    ),
    "seed": Option(0, "seed of carved splits (and of generated data)", kind=int),
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


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, np.integer)):
        return [str(value)]
    return [str(v) for v in value]


def parse_remap(text: str) -> dict[str, list[str]]:
    """Parse `new=old,old;new=old` (or a JSON object) into {new: [old, ...]}."""
    text = text.strip()
    if text.startswith("{"):
        import json

        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoadbenchError(f"remap is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise LoadbenchError("remap JSON must be an object {new_class: [old classes]}")
        return {str(k): _as_list(v) for k, v in parsed.items()}
    mapping: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        new, sep, olds = part.partition("=")
        if not sep or not new.strip() or not olds.strip():
            raise LoadbenchError(
                f"remap part {part!r} is not NEW=OLD[,OLD...]; "
                "example: 'upper=0,2,3,4,6;trousers=1;shoes=5,7,9'"
            )
        mapping[new.strip()] = _as_list(olds)
    if not mapping:
        raise LoadbenchError("remap is empty; example: 'upper=0,2,3,4,6;trousers=1;shoes=5,7,9'")
    return mapping


class RawSplit:
    """One split as published: every label known, images decoded on demand."""

    labels: np.ndarray

    def load(self, indices: np.ndarray) -> np.ndarray:
        """Decode the images at `indices` (any order) into uint8 (n, H, W, C)."""
        raise NotImplementedError

    def original_sizes(self, indices: np.ndarray) -> OriginalSizes | None:
        """Width, height and file size of the images before any resizing (file sources only)."""
        return None

    def corrupt(self, indices: np.ndarray) -> np.ndarray:
        """Positions in `indices` whose images cannot be decoded (file sources only)."""
        return np.zeros(0, dtype=np.int64)


class ArraySplit(RawSplit):
    """A split already decoded into memory (CIFAR, IDX, digits)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


@dataclass
class OriginalSizes:
    width: np.ndarray
    height: np.ndarray
    file_bytes: np.ndarray


@dataclass
class RawDataset:
    """What a source kind reads from its layout, before the common options are applied."""

    classes: list[str]
    image_shape: ImageShape
    splits: dict[str, RawSplit]
    details: dict[str, Any] = field(default_factory=dict)  # e.g. class descriptions, file counts
    notes: list[str] = field(default_factory=list)  # things the user should know (skipped files)


@dataclass
class _Selection:
    raw: RawSplit
    indices: np.ndarray  # positions in the raw split, in output order
    labels: np.ndarray  # labels after remapping


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
        self.classes, selections = _apply_options(raw, options)
        self._splits = selections

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def _get(self, split: str) -> _Selection:
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
            clone._splits[name] = _Selection(raw, np.arange(len(sel.indices)), sel.labels)
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
                    self._splits[name] = _Selection(sel.raw, sel.indices[keep], sel.labels[keep])
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


def _apply_options(raw: RawDataset, opts: SourceOptions) -> tuple[list[str], dict[str, _Selection]]:
    classes, old_to_new = _class_mapping(raw.classes, opts)
    selections: dict[str, _Selection] = {}
    for name, split in raw.splits.items():
        new_labels = old_to_new[split.labels]
        keep = np.flatnonzero(new_labels >= 0)
        selections[name] = _Selection(split, keep, new_labels[keep])
    for carved, ratio in (("test", opts.test_ratio), ("val", opts.val_ratio)):
        if ratio is None:
            continue
        if carved in selections:
            raise LoadbenchError(
                f"{carved}_ratio given but the source already has a {carved!r} split; "
                f"drop {carved}_ratio to use it"
            )
        if "train" not in selections:
            raise LoadbenchError(f"{carved}_ratio needs a 'train' split to carve from")
        train = selections["train"]
        take = stratified_sample(train.labels, ratio, opts.seed + (1 if carved == "val" else 0))
        rest = np.setdiff1d(np.arange(len(train.indices)), take)
        selections[carved] = _Selection(train.raw, train.indices[take], train.labels[take])
        selections["train"] = _Selection(train.raw, train.indices[rest], train.labels[rest])
    if opts.limit is not None:
        for name, sel in selections.items():
            pos = first_n_stratified(sel.labels, opts.limit)
            selections[name] = _Selection(sel.raw, sel.indices[pos], sel.labels[pos])
    order = [s for s in ("train", "val", "test") if s in selections]
    order += [s for s in selections if s not in order]
    return classes, {s: selections[s] for s in order}


def _class_ref(ref: str, classes: list[str]) -> int:
    """A class given by name, or by index when no class has that name."""
    if ref in classes:
        return classes.index(ref)
    if ref.lstrip("-").isdigit() and 0 <= int(ref) < len(classes):
        return int(ref)
    shown = ", ".join(f"{i}={c}" for i, c in enumerate(classes[:20]))
    more = f", ... ({len(classes)} in all)" if len(classes) > 20 else ""
    raise LoadbenchError(f"unknown class {ref!r}; the source's classes are {shown}{more}")


def _class_mapping(classes: list[str], opts: SourceOptions) -> tuple[list[str], np.ndarray]:
    """New class names and an old-index -> new-index table (-1 = dropped)."""
    dropped = {_class_ref(r, classes) for r in opts.drop}
    old_to_new = np.full(len(classes), -1, dtype=np.int64)
    if not opts.remap:
        kept = [i for i in range(len(classes)) if i not in dropped]
        old_to_new[kept] = np.arange(len(kept))
        return [classes[i] for i in kept], old_to_new
    for new_index, olds in enumerate(opts.remap.values()):
        for ref in olds:
            old = _class_ref(ref, classes)
            if old in dropped or old_to_new[old] >= 0:
                raise LoadbenchError(f"class {classes[old]!r} is mapped or dropped twice in remap")
            old_to_new[old] = new_index
    missing = [classes[i] for i in range(len(classes)) if old_to_new[i] < 0 and i not in dropped]
    if missing:
        raise LoadbenchError(
            f"remap does not say where class(es) {', '.join(map(repr, missing))} go; "
            "map them to a new class or list them in drop"
        )
    return list(opts.remap), old_to_new


def first_n_stratified(labels: np.ndarray, n: int) -> np.ndarray:
    """Positions of the first `n` items, as evenly spread over classes as counts allow.

    Keeps the original order, so a limit of a CIFAR split is still 'the first images', just
    with every class present.
    """
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    left = n
    # Water-filling: classes smaller than an equal share give their unused share to the others.
    by_size = np.argsort(counts, kind="stable")
    for rank, ci in enumerate(by_size):
        share = left // (len(classes) - rank)
        if counts[ci] > share:  # this class and every larger one get the equal share
            quota[by_size[rank:]] = share
            left -= share * (len(classes) - rank)
            break
        quota[ci] = counts[ci]
        left -= counts[ci]
    # The remainder of the integer division goes to the first classes that still have images,
    # so a balanced split limited to N is exactly its first N images.
    for ci in range(len(classes)):
        if left == 0:
            break
        if quota[ci] < counts[ci]:
            quota[ci] += 1
            left -= 1
    class_pos = np.searchsorted(classes, labels)
    # Rank of every item inside its class, in original order (a stable sort groups the classes).
    order = np.argsort(class_pos, kind="stable")
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    rank_in_class[order] = np.arange(len(labels)) - starts
    return np.flatnonzero(rank_in_class < quota[class_pos])


def stratified_sample(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded, per-class `ratio` sample (at least one per class if >1)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        k = int(round(ratio * len(pos)))
        if k == 0 and len(pos) > 1:
            k = 1
        picked.append(rng.choice(pos, size=k, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
