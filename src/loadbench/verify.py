"""Prove that a store gives back what went in.

Every image of every split is read back through the format's own reader and hashed: the hashes
must equal the manifest's (written at conversion time from what a reader decodes), so any
altered, truncated or misread byte shows up, located to a block of images. Given the source too,
every image is compared with the source's: exactly for lossless formats and dtypes, and as PSNR
for JPEG (failing under a threshold, 30 dB by default).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from loadbench import progress
from loadbench.checksums import ContentHash
from loadbench.errors import LoadbenchError
from loadbench.formats import SplitReader, to_stored, to_uint8
from loadbench.manifest import MANIFEST, find_remote_stores, find_stores
from loadbench.remote import is_url
from loadbench.sources import Source, load_source
from loadbench.store import Store, open_store

DEFAULT_PSNR_DB = 30.0


@dataclass
class SplitCheck:
    """The verdict on one split of one store."""

    store: str
    format: str
    dtype: str
    split: str
    count: int
    checksum_ok: bool = False
    bad_blocks: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) image ranges
    compared: bool = False  # compared with the source
    exact_images: int | None = None  # images identical to the source's
    label_mismatches: int | None = None
    psnr_db: float | None = None  # over the whole split (lossy formats)
    worst_psnr_db: float | None = None
    worst_index: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def verify_path(
    path: str, source: str | Source | None = None, psnr_threshold_db: float = DEFAULT_PSNR_DB
) -> list[SplitCheck]:
    """Verify one store, or every store directly inside a folder (or under a URL prefix)."""
    checks: list[SplitCheck] = []
    sources: dict[str, Source] = {}  # one load per distinct source, shared by the stores
    for store_path in _stores_at(str(path)):
        checks.extend(_verify_or_report(store_path, source, psnr_threshold_db, sources))
    return checks


def _stores_at(path: str) -> list[str]:
    """The store at `path`, or the stores directly inside it (a folder or a URL prefix)."""
    if is_url(path):
        paths = find_remote_stores(path)
        if not paths:
            raise LoadbenchError(f"{path} is neither a store nor a prefix of stores")
        return paths
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise LoadbenchError(f"no store at {path}: not a directory")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return [path]
    paths = find_stores(path)
    if not paths:
        raise LoadbenchError(
            f"{path} is neither a store nor a folder of stores (no manifest.json found)"
        )
    return paths


def _verify_or_report(path, source, threshold, sources) -> list[SplitCheck]:
    """A damaged store becomes a failed row, so the other stores of a folder still get checked."""
    try:
        store = open_store(path)
    except LoadbenchError as e:
        failed = SplitCheck(path, "?", "?", "-", 0)
        failed.problems.append(str(e))
        return [failed]
    try:
        if source is not None and not isinstance(source, Source):
            source = source_for(store, source, sources)
        return verify_store(store, source, threshold)
    finally:
        store.close()


def source_for(store: Store, spec: str | Source, cache: dict | None = None) -> Source:
    """The source to compare with; a spec without options takes the store's recorded ones."""
    if isinstance(spec, Source):
        return spec
    options = {} if "?" in spec else store.manifest.source.get("options", {})
    key = json.dumps([spec, options], sort_keys=True)
    if cache is not None and key in cache:
        return cache[key]
    source = load_source(spec, **options)
    if cache is not None:
        source = cache[key] = source.in_memory()
    return source


def verify_store(
    store: Store, source: str | Source | None = None, psnr_threshold_db: float = DEFAULT_PSNR_DB
) -> list[SplitCheck]:
    m = store.manifest
    src = source_for(store, source) if source is not None else None
    checks = []
    total = sum(info.count for info in m.splits.values())
    with progress.task(f"verify {store.path.rstrip('/').rsplit('/', 1)[-1]}", total) as advance:
        for split, info in m.splits.items():
            check = SplitCheck(store.path, m.format, m.dtype, split, info.count)
            try:
                _check_split(store, split, src, psnr_threshold_db, check, advance)
            except LoadbenchError as e:
                check.problems.append(str(e))
            checks.append(check)
    return checks


def _check_split(store, split, src, threshold, check: SplitCheck, advance) -> None:
    m = store.manifest
    info = m.splits[split]
    block = m.checksum_block
    reader = store.raw(split)
    source_batches = None
    if src is not None:
        source_batches = _source_batches(src, store, split, check)
    content = ContentHash(block)
    squared_error, pixels = 0.0, 0
    exact, label_mismatches = 0, 0
    worst = (math.inf, None)
    read_labels = []
    for start, images, labels in reader.iter_blocks(block):
        content.update(images, labels)
        read_labels.append(np.asarray(labels, dtype=np.int64))
        advance(len(images))
        if source_batches is None:
            continue
        expected_images, expected_labels = next(source_batches)
        label_mismatches += int(np.count_nonzero(labels != expected_labels))
        expected = to_stored(expected_images, m.dtype)
        same = (images == expected).reshape(len(images), -1).all(axis=1)
        exact += int(same.sum())
        if m.lossy:
            diff = to_uint8(images).astype(np.float64) - expected_images
            mse = (diff * diff).reshape(len(images), -1).mean(axis=1)
            squared_error += float(mse.sum()) * diff[0].size
            pixels += diff.size
            k = int(np.argmax(mse))
            if _psnr(mse[k]) < worst[0]:
                worst = (_psnr(mse[k]), start + k)
        elif not same.all() and not check.problems:
            first = start + int(np.flatnonzero(~same)[0])
            check.problems.append(f"image {first} differs from the source")
    _check_label_list(reader, read_labels, check)
    _check_digest(content.finish(), info, block, check)
    if source_batches is not None:
        check.compared = True
        check.exact_images = exact
        check.label_mismatches = label_mismatches
        if label_mismatches:
            check.problems.append(f"{label_mismatches} label(s) differ from the source")
        if m.lossy and pixels:
            check.psnr_db = _psnr(squared_error / pixels)
            check.worst_psnr_db, check.worst_index = worst
            if check.psnr_db < threshold:
                check.problems.append(
                    f"PSNR {check.psnr_db:.1f} dB is under the {threshold:g} dB threshold"
                )


def _check_digest(digest: dict, info, block: int, check: SplitCheck) -> None:
    """The split's hashes against the manifest's; the image ranges of the blocks that differ."""
    check.checksum_ok = digest["images_sha256"] == info.images_sha256
    if check.checksum_ok and digest["labels_sha256"] == info.labels_sha256:
        return
    check.bad_blocks = [
        (i * block, min((i + 1) * block, check.count))
        for i, (got, want) in enumerate(
            zip(digest["block_sha256"], info.block_sha256, strict=False)
        )
        if got != want
    ]
    where = ", ".join(f"{a}-{b - 1}" for a, b in check.bad_blocks[:5]) or "?"
    what = "images" if not check.checksum_ok else "labels"
    check.problems.insert(0, f"{what} differ from the manifest's checksum (images {where})")


def _check_label_list(reader, read_labels: list[np.ndarray], check: SplitCheck) -> None:
    """A reader that keeps the split's labels apart from its images (`labels()`, what class
    balancing and label counts use) must list the very labels that its images carry."""
    if type(reader).labels is SplitReader.labels:
        return  # its labels() reads the images again
    listed = np.asarray(reader.labels()).reshape(-1)
    read = np.concatenate(read_labels) if read_labels else np.empty(0, dtype=np.int64)
    if len(listed) != len(read) or not np.array_equal(listed, read):
        differ = np.flatnonzero(listed != read) if len(listed) == len(read) else [0]
        check.problems.append(
            f"the split's list of labels differs from its images' labels (image {differ[0]})"
        )


def _source_batches(src: Source, store: Store, split: str, check: SplitCheck):
    m = store.manifest
    if split not in src.splits:
        check.problems.append(f"the source has no split {split!r}")
        return None
    if src.count(split) != check.count:
        check.problems.append(
            f"the source's {split} has {src.count(split)} images, the store {check.count}"
        )
        return None
    if tuple(src.image_shape) != tuple(m.image_shape):
        check.problems.append(
            f"the source's images are {src.image_shape}, the store's {tuple(m.image_shape)}"
        )
        return None
    return src.iter_batches(split, m.checksum_block)


def _psnr(mse: float) -> float:
    return math.inf if mse <= 0 else 10 * math.log10(255.0**2 / mse)
