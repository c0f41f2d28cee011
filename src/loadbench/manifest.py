"""A store's `manifest.json`: what the store holds, one model for writing and reading it.

A directory (or an object-storage prefix) is a store only once its manifest is there: the
manifest is written last, so a store that is being made is never taken for one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.formats import DTYPES, get_format, is_format
from loadbench.remote import join
from loadbench.storefiles import StoreFiles
from loadbench.util import write_text_atomic

MANIFEST = "manifest.json"
# The manifest's own layout (each format's files have their `format_version`). A store of
# another schema is refused with what to do.
MANIFEST_SCHEMA = 1
# One image of a store is at most this big (2 GiB): a damaged shape must not make readers
# allocate terabytes for a batch.
MAX_IMAGE_BYTES = 1 << 31


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # a format's own facts (chunk_images, shards, ...)

    count: int
    label_counts: list[int]
    images_sha256: str
    labels_sha256: str
    block_sha256: list[str]


class Manifest(BaseModel):
    """Everything needed to read a store back and to know what is in it."""

    model_config = ConfigDict(extra="allow")

    loadbench_store: int  # MANIFEST_SCHEMA of the loadbench that wrote it
    format: str
    format_version: int
    dtype: str
    image_shape: tuple[int, int, int]
    classes: list[str]
    splits: dict[str, SplitInfo]
    options: dict[str, Any]
    lossy: bool
    checksum_block: int  # images per block hash in `block_sha256`
    identity: str  # hash of (source, format, dtype, options): same identity, same store
    source: dict[str, Any]
    files: dict[str, int]  # relative path -> size in bytes, checked on open
    bytes: int  # total size of the store's files
    bytes_allocated: int  # what the filesystem allocates for them (blocks)
    convert_time_s: float  # time spent in the format's writer (encode, write, pack)
    total_time_s: float  # the whole conversion: reading the source, dtype, checksums, writing
    created: str
    loadbench_version: str


def write_manifest(directory: str, manifest: Manifest) -> None:
    """The manifest into a store's directory, on disk before it counts (fsync)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=1)
    write_text_atomic(os.path.join(directory, MANIFEST), text, fsync=True)


def read_manifest(files: StoreFiles | str) -> Manifest:
    """The manifest of the store at `files` (a directory, or object storage), checked; read
    from the store itself, never from a read-through copy."""
    if isinstance(files, str):
        files = StoreFiles(files)
    if not files.remote and not os.path.isdir(files.root):
        raise LoadbenchError(f"no store at {files.root}: not a directory")
    if not has_manifest(files):
        _not_a_store(files)
    where = join(files.root, MANIFEST)
    try:
        data = json.loads(files.read_direct(MANIFEST))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStoreError(
            f"{where} is not readable JSON ({e}); convert the store again"
        ) from None
    return parse_manifest(data, where)


def has_manifest(files: StoreFiles) -> bool:
    """Whether a manifest is at the store's root; on object storage a missing bucket is an
    error. The bucket is asked about only without a manifest: credentials may read objects
    without seeing buckets."""
    if files.exists(MANIFEST):
        return True
    if files.remote:
        bucket = files.remote_path("").strip("/").split("/")[0]
        with files.errors():
            found = files.fs.exists(bucket)
        if not found:
            raise LoadbenchError(
                f"{files.root}: bucket {bucket!r} does not exist (or is not visible with "
                "these credentials); create it or check the URL"
            )
    return False


def _not_a_store(files: StoreFiles) -> None:
    path = files.root
    stores = [] if files.remote else find_stores(path)
    if stores:
        names = ", ".join(os.path.relpath(s, path) for s in stores[:5])
        more = ", ..." if len(stores) > 5 else ""
        raise LoadbenchError(
            f"{path} is a folder of {len(stores)} stores ({names}{more}); open one of them"
        )
    raise LoadbenchError(
        f"{path} is not a loadbench store: it has no {MANIFEST}; create one with "
        f"`loadbench convert SOURCE --format FORMAT --out {path}`"
    )


def parse_manifest(data: Any, file: str) -> Manifest:
    """The manifest in `data` (JSON already parsed), checked; `file` names it in errors."""
    if not isinstance(data, dict) or "loadbench_store" not in data:
        raise LoadbenchError(
            f"{file} was not written by loadbench (no 'loadbench_store' key); "
            "point at a store made by `loadbench convert`"
        )
    if data["loadbench_store"] != MANIFEST_SCHEMA:
        raise LoadbenchError(
            f"{file} has store schema {data['loadbench_store']}, this loadbench reads "
            f"{MANIFEST_SCHEMA}; convert the store again with this version"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise CorruptStoreError(f"{file} is damaged: {where}: {first['msg']}") from None
    if not is_format(manifest.format):
        raise LoadbenchError(f"{file} names unknown format {manifest.format!r}")
    if manifest.dtype not in DTYPES:
        raise CorruptStoreError(f"{file} names unknown dtype {manifest.dtype!r}")
    if problem := _inconsistency(manifest):
        raise CorruptStoreError(f"{file} is damaged: {problem}; convert the store again")
    try:  # typed, with the defaults of options added since the store was written
        manifest.options = get_format(manifest.format).parse_options(manifest.options)
    except LoadbenchError as e:
        raise CorruptStoreError(f"{file} is damaged: {e}") from None
    return manifest


def _inconsistency(m: Manifest) -> str | None:
    """What in a manifest that parsed contradicts the rest of it (values a damaged or hostile
    file could hold, which readers and `verify` would otherwise take as sizes), else None."""
    h, w, c = m.image_shape
    if min(h, w, c) < 1 or h * w * c * np.dtype(DTYPES[m.dtype]).itemsize > MAX_IMAGE_BYTES:
        return f"image_shape {list(m.image_shape)} is no image loadbench stores"
    if m.checksum_block < 1:
        return f"checksum_block is {m.checksum_block}"
    for split, info in m.splits.items():
        counts = info.label_counts
        if info.count < 0 or len(counts) != len(m.classes) or min(counts, default=0) < 0:
            return f"split {split!r} has count {info.count}, label_counts of {len(counts)} classes"
        if sum(counts) != info.count:
            return f"split {split!r} has {info.count} images, label_counts add up to {sum(counts)}"
        if len(info.block_sha256) != -(-info.count // m.checksum_block):
            return f"split {split!r} has {len(info.block_sha256)} block checksums"
    for rel, size in m.files.items():
        parts = rel.replace("\\", "/").split("/")
        if rel.startswith("/") or ".." in parts or size < 0:
            return f"files lists {rel!r} of {size} bytes"
    return None


def check_files(files: StoreFiles, manifest: Manifest) -> None:
    """Every file the manifest lists exists with the recorded size (catches truncation)."""
    found = files.sizes(list(manifest.files))
    for rel, size in manifest.files.items():
        if found[rel] is None:
            raise CorruptStoreError(
                f"store {files.root} is damaged: {rel} is missing; convert the store again"
            )
        if found[rel] != size:
            raise CorruptStoreError(
                f"store {files.root} is damaged: {rel} is {found[rel]} bytes, the manifest "
                f"says {size}; convert the store again"
            )


def find_stores(path: str) -> list[str]:
    """Stores directly inside `path` (one level down), sorted by name."""
    if not os.path.isdir(path):
        return []
    found = [
        e.path
        for e in os.scandir(path)
        if e.is_dir() and os.path.isfile(os.path.join(e.path, MANIFEST))
    ]
    return sorted(found)


def find_remote_stores(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """`url` when it is a store, else the stores directly under it (URLs, sorted)."""
    files = StoreFiles(url, storage_options)
    with files.errors():
        fs = files.fs
        if fs.exists(files.remote_path(MANIFEST)):
            return [files.root]
        base = files.remote_path("").rstrip("/")
        found = fs.glob(f"{base}/*/{MANIFEST}")
    protocol = url.partition("://")[0]
    return sorted(f"{protocol}://{p[: -len(MANIFEST) - 1]}" for p in found)
