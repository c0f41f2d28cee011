"""Write a source into a store of one format, atomically, with content checksums.

The store is built under a temporary name beside its destination and renamed into place only
when complete, so an interrupted conversion never leaves a directory that `open_store` accepts.
A store that already exists with the same identity (source, format, dtype, options) is reused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.formats import SplitLayout, expand_names, get_format, to_stored
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
    **options: Any,
) -> Store:
    """Write `source` into a new store of `format` at `out` and return it opened.

    If `out` already holds a store with the same source, format, dtype and options, it is
    reused (`store.skipped` is True). A different store there is an error unless `overwrite`.
    """
    if isinstance(source, str):
        source = load_source(source)
    fmt = get_format(format)
    if missing := fmt.missing():
        raise LoadbenchError(missing)
    options = fmt.resolve_options(dtype, {k: v for k, v in options.items() if v is not None})
    out = os.path.abspath(os.path.expanduser(str(out)))
    identity = store_identity(source, format, dtype, options)
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
        manifest = _write_store(source, fmt, tmp, dtype, options, identity)
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
    source: Source, fmt, root: str, dtype: str, options: dict, identity: str
) -> dict[str, Any]:
    started = time.perf_counter()
    writing_s = 0.0  # time inside the format's writer: the conversion cost of the format itself
    block = checksum_block(source.image_shape)
    splits: dict[str, Any] = {}
    total = sum(source.count(s) for s in source.splits)
    with progress.task(f"{source.spec} -> {fmt.name} ({dtype})", total) as advance:
        for split in source.splits:
            layout = SplitLayout(
                root=root,
                split=split,
                count=source.count(split),
                image_shape=source.image_shape,
                dtype=dtype,
                options=options,
                classes=source.classes,
            )
            t0 = time.perf_counter()
            writer = fmt.writer(layout)
            writing_s += time.perf_counter() - t0
            content = ContentHash(block)
            for images, labels in source.iter_batches(split, block):
                batch = to_stored(images, dtype)
                t0 = time.perf_counter()
                stored = writer.write(batch, labels)
                writing_s += time.perf_counter() - t0
                content.update(stored, labels)
                advance(len(images))
            t0 = time.perf_counter()
            extra = writer.close()
            writing_s += time.perf_counter() - t0
            labels = source.labels(split)
            splits[split] = {
                "count": source.count(split),
                "label_counts": np.bincount(labels, minlength=len(source.classes)).tolist(),
                **content.finish(),
                **extra,
            }
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
    **options: Any,
) -> list[Converted]:
    """One store per format under `out_dir/<format>-<dtype>`; formats that cannot hold the
    dtype are skipped with a note. An option that none of the formats takes is an error."""
    if isinstance(source, str):
        source = load_source(source)
    names = resolve_formats(formats) if isinstance(formats, str) else list(formats)
    given = {k: v for k, v in options.items() if v is not None}
    fmts = [get_format(n) for n in names]
    unused = sorted(k for k in given if not any(k in f.options for f in fmts))
    if unused:
        raise LoadbenchError(f"option {', '.join(unused)} applies to none of {', '.join(names)}")
    if len(fmts) > 1:
        source = source.in_memory()  # read or decode the source once, not once per format
    results = []
    for fmt in fmts:
        if dtype not in fmt.dtypes:
            note = f"skipped: {fmt.name} stores {'/'.join(fmt.dtypes)} only"
            results.append(Converted(fmt.name, "", None, note))
            continue
        path = os.path.join(out_dir, store_name(fmt.name, dtype))
        own = {k: v for k, v in given.items() if k in fmt.options}
        store = convert(source, fmt.name, path, dtype, overwrite=overwrite, **own)
        note = "exists (same source and settings): reused" if store.skipped else ""
        results.append(Converted(fmt.name, path, store, note))
    return results
