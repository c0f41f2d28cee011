"""Converting into object storage: the store is written locally, then uploaded, manifest last.

Object storage has no rename, so the manifest is the commit: it is removed first when a store is
replaced and written only after every other file is up. A reader (`open_store`) refuses a prefix
without a manifest and checks every listed file's size, so an interrupted upload is never taken
for a store, and converting again replaces it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.remote import StoreFiles
from loadbench.store import (
    MANIFEST,
    Store,
    has_remote_manifest,
    open_store,
    read_remote_manifest,
)

UPLOAD_BATCH = 256  # files per concurrent `put` (the progress bar moves between batches)


def convert_to_url(
    source,
    fmt,
    url: str,
    dtype: str,
    identity: str,
    *,
    overwrite: bool,
    storage_options: dict[str, Any],
    options: dict[str, Any],
    staging_dir: str | None = None,
    jobs: int = 1,
) -> Store:
    """`conversion.convert` for an fsspec URL, after it resolved the format's `options` and
    the store's `identity`: reuse an identical store there, else convert into a local staging
    directory and upload it."""
    from loadbench.conversion import convert

    if fmt.peer:
        raise LoadbenchError(f"{fmt.name} is a peer loader, which reads local stores only")
    files = StoreFiles(url, storage_options)
    existing = _existing(files)
    if existing == identity:
        store = open_store(url, storage_options=storage_options)
        store.skipped = True
        return store
    occupied = existing is not None or _occupied(files)
    if occupied and not overwrite:
        what = "a different store" if existing else "objects that are not a store"
        raise LoadbenchError(
            f"{url} already holds {what}; choose another --out or pass --overwrite"
        )
    with tempfile.TemporaryDirectory(prefix="loadbench-upload-", dir=staging_dir) as tmp:
        local = convert(source, fmt.name, os.path.join(tmp, "store"), dtype, jobs=jobs, **options)
        local.close()
        upload(local.path, files, replace=occupied)
    return open_store(url, storage_options=storage_options)


def _existing(files: StoreFiles) -> str | None:
    """The identity of the store at `files.root`, None when there is none (or a broken one)."""
    if not has_remote_manifest(files):
        return None
    try:
        return read_remote_manifest(files).identity
    except LoadbenchError:
        return None


def _occupied(files: StoreFiles) -> bool:
    with files.errors():
        return bool(files.fs.find(files.remote_path("").rstrip("/"), maxdepth=None))


def upload(local_dir: str, files: StoreFiles, *, replace: bool) -> None:
    """Every file of `local_dir` to `files.root`, the manifest last; with `replace`, the old
    manifest is removed first and then the old objects."""
    fs = files.fs
    base = files.remote_path("").rstrip("/")
    names, total = [], 0
    for dirpath, _, found in os.walk(local_dir):
        for name in found:
            rel = os.path.relpath(os.path.join(dirpath, name), local_dir)
            if rel != MANIFEST:
                names.append(rel)
                total += os.path.getsize(os.path.join(dirpath, name))
    names.sort()
    with files.errors():
        if replace:
            if fs.exists(f"{base}/{MANIFEST}"):
                fs.rm_file(f"{base}/{MANIFEST}")
            fs.rm(base, recursive=True)
        with progress.task(f"upload to {files.root}", total) as advance:
            for at in range(0, len(names), UPLOAD_BATCH):
                batch = names[at : at + UPLOAD_BATCH]
                fs.put(
                    [os.path.join(local_dir, rel) for rel in batch],
                    [f"{base}/{rel}" for rel in batch],
                )
                advance(sum(os.path.getsize(os.path.join(local_dir, rel)) for rel in batch))
        fs.put_file(os.path.join(local_dir, MANIFEST), f"{base}/{MANIFEST}")
    fs.invalidate_cache()
