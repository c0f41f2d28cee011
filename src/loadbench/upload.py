"""Putting a store on object storage: a store converted locally is uploaded, manifest last.

Object storage has no rename, so the manifest is the commit: it is removed first when a store is
replaced and written only after every other file is up. A reader (`open_store`) refuses a prefix
without a manifest and checks every listed file's size, so an interrupted upload is never taken
for a store, and converting again replaces it.
"""

from __future__ import annotations

import os

from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.manifest import MANIFEST, has_manifest, read_manifest
from loadbench.storefiles import StoreFiles

UPLOAD_BATCH = 256  # files per concurrent `put` (the progress bar moves between batches)


def existing_identity(files: StoreFiles) -> str | None:
    """The identity of the store at `files.root`, None when there is none (or a broken one)."""
    if not has_manifest(files):
        return None
    try:
        return read_manifest(files).identity
    except LoadbenchError:
        return None


def occupied(files: StoreFiles) -> bool:
    """Whether anything is under the prefix (a store, a broken one, or other objects)."""
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
