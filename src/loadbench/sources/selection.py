"""Which images of a source's raw splits it keeps, and in which split: classes remapped or
dropped, every split pooled and split again (`resplit`), val/test carved from train, limits.
Only indices are chosen here; nothing is decoded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.sources.raw import PooledSplit, RawDataset, RawSplit


@dataclass
class Selection:
    raw: RawSplit
    indices: np.ndarray  # positions in the raw split, in output order
    labels: np.ndarray  # labels after remapping


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


def apply_options(raw: RawDataset, opts) -> tuple[list[str], dict[str, Selection], list[str]]:
    """The classes, the splits (train, val, test, then any other) and notes for the user, after
    the options every source takes: remap/drop, resplit, carved val/test, limit."""
    classes, old_to_new = _class_mapping(raw.classes, opts)
    selections: dict[str, Selection] = {}
    for name, split in raw.splits.items():
        new_labels = old_to_new[split.labels]
        keep = np.flatnonzero(new_labels >= 0)
        selections[name] = Selection(split, keep, new_labels[keep])
    notes: list[str] = []
    if opts.resplit is not None:
        if opts.val_ratio is not None or opts.test_ratio is not None:
            raise LoadbenchError(
                "resplit makes every split from the pooled images: drop val_ratio/test_ratio"
            )
        selections, note = _resplit(selections, opts.resplit, opts.seed, raw.image_shape)
        notes.append(note)
    for carved, ratio in (("test", opts.test_ratio), ("val", opts.val_ratio)):
        if ratio is not None:
            selections = _carve(selections, carved, ratio, opts.seed + (carved == "val"))
    if opts.limit is not None:
        for name, sel in selections.items():
            pos = first_n_stratified(sel.labels, opts.limit)
            selections[name] = Selection(sel.raw, sel.indices[pos], sel.labels[pos])
    order = [s for s in ("train", "val", "test") if s in selections]
    order += [s for s in selections if s not in order]
    return classes, {s: selections[s] for s in order}, notes


def _carve(selections: dict[str, Selection], carved: str, ratio: float,
           seed: int) -> dict[str, Selection]:  # fmt: skip
    """A stratified `ratio` of what train holds now becomes split `carved`."""
    if carved in selections:
        raise LoadbenchError(
            f"{carved}_ratio given but the source already has a {carved!r} split; "
            f"drop {carved}_ratio to use it, or pool every split with resplit"
        )
    if "train" not in selections:
        raise LoadbenchError(f"{carved}_ratio needs a 'train' split to carve from")
    train = selections["train"]
    take = stratified_sample(train.labels, ratio, seed)
    rest = np.setdiff1d(np.arange(len(train.indices)), take)
    return {
        **selections,
        carved: Selection(train.raw, train.indices[take], train.labels[take]),
        "train": Selection(train.raw, train.indices[rest], train.labels[rest]),
    }


SPLIT_NAMES = ("train", "val", "test")


def parse_fractions(value) -> tuple[float, float, float]:
    """`resplit`: the train, val and test shares of the whole: '70,15,15', '0.7,0.15,0.15',
    or '80,0,20' (no val)."""
    try:
        shares = tuple(float(v) for v in _as_list(value))
    except (TypeError, ValueError):
        shares = ()
    total = sum(shares)
    scale = 100.0 if abs(total - 100.0) < 1e-6 else 1.0
    if len(shares) != 3 or min(shares) < 0 or abs(total / scale - 1.0) > 1e-6:
        raise ValueError(
            "must be the train,val,test shares of the whole, summing to 100 (or 1): '70,15,15'"
        )
    return tuple(share / scale for share in shares)  # type: ignore[return-value]


def _resplit(selections: dict[str, Selection], shares: tuple[float, float, float], seed: int,
             image_shape) -> tuple[dict[str, Selection], str]:  # fmt: skip
    """Every split pooled, then split again into train/val/test by `shares` of each class,
    seeded; positions keep the pooled order (the source's splits, one after another)."""
    pooled = PooledSplit([(s.raw, s.indices, s.labels) for s in selections.values()],
                         image_shape)  # fmt: skip
    rng = np.random.default_rng([seed, 0x5EED])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for c in np.unique(pooled.labels):
        members = rng.permutation(np.flatnonzero(pooled.labels == c))
        n_val, n_test = (int(round(share * len(members))) for share in shares[1:])
        cuts = {"test": members[:n_test], "val": members[n_test : n_test + n_val],
                "train": members[n_test + n_val :]}  # fmt: skip
        for name in SPLIT_NAMES:
            parts[name].append(cuts[name])
    out = {}
    for name in SPLIT_NAMES:
        positions = np.sort(np.concatenate(parts[name])) if parts[name] else np.zeros(0, np.int64)
        if len(positions) or shares[SPLIT_NAMES.index(name)] > 0:
            out[name] = Selection(pooled, positions, pooled.labels[positions])
    counts = " / ".join(f"{name} {len(sel.indices):,}" for name, sel in out.items())
    given = "/".join(f"{share * 100:g}" for share in shares)
    note = (
        f"resplit: pooled {len(pooled.labels):,} images of {', '.join(selections)} and split "
        f"them {counts} ({given}% of each class, seed {seed})"
    )
    return out, note


def _class_ref(ref: str, classes: list[str]) -> int:
    """A class given by name, or by index when no class has that name."""
    if ref in classes:
        return classes.index(ref)
    if ref.lstrip("-").isdigit() and 0 <= int(ref) < len(classes):
        return int(ref)
    shown = ", ".join(f"{i}={c}" for i, c in enumerate(classes[:20]))
    more = f", ... ({len(classes)} in all)" if len(classes) > 20 else ""
    raise LoadbenchError(f"unknown class {ref!r}; the source's classes are {shown}{more}")


def _class_mapping(classes: list[str], opts) -> tuple[list[str], np.ndarray]:
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
