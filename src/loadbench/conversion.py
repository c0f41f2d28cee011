"""Write a source into a store of one format, atomically, with content checksums.

The store is built under a temporary name beside its destination and renamed into place only
when complete, so an interrupted conversion never leaves a directory that `open_store` accepts.
A store that already exists with the same identity (source, format, dtype, options) is reused.
A store for object storage (`s3://...`) is converted locally, then uploaded (`upload.py`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from loadbench import upload
from loadbench.errors import (
    LoadbenchError,
    OutOfSpaceError,
    explain_os_error,
    is_out_of_space,
    nearly_full,
    writing,
)
from loadbench.formats import Format, expand_names, get_format
from loadbench.manifest import MANIFEST, MANIFEST_SCHEMA, read_manifest, write_manifest
from loadbench.remote import is_url, join
from loadbench.sources import Source, load_source
from loadbench.store import Store, open_store
from loadbench.storefiles import StoreFiles
from loadbench.util import pid_alive
from loadbench.writing import write_store


def store_identity(source: Source, format_name: str, dtype: str, options: dict) -> str:
    fmt = get_format(format_name)
    key = {
        "schema": MANIFEST_SCHEMA,
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
    uploaded with its manifest last (see `upload.py`).
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
        return _convert_to_url(source, fmt, str(out), dtype, identity, options, overwrite,
                               storage_options or {}, jobs)  # fmt: skip
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(out):
        existing = _existing_identity(out)
        if existing == identity:
            return _reused(open_store(out))
        if not overwrite:
            what = "a different store" if existing else "something that is not a store"
            raise LoadbenchError(
                f"{out} already holds {what}; choose another --out or pass --overwrite"
            )
    _write_atomically(source, fmt, out, dtype, options, identity, jobs)
    return open_store(out)


def _reused(store: Store) -> Store:
    store.skipped = True
    return store


def _write_atomically(source: Source, fmt: Format, out: str, dtype: str, options: dict,
                      identity: str, jobs: int) -> None:  # fmt: skip
    """The store written under a temporary name beside `out`, then renamed to it; on any
    failure the partial store is removed, and a place that cannot be written (full, read-only,
    forbidden) is said in one line."""
    with writing(out, "converting into"):
        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        _remove_stale_partials(out)
        tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            write_manifest(tmp, write_store(source, fmt, tmp, dtype, options, identity, jobs))
            _replace(tmp, out)
        except BaseException as e:
            full = _full_disk(e, out)  # said before the partial store frees its space
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise full from None
            raise


def _full_disk(error: BaseException, out: str) -> OutOfSpaceError | None:
    """`error` as a full disk under `out`, or None when it is something else (errors of writers
    that do not pass ENOSPC on: `nearly_full`)."""
    if is_out_of_space(error):
        return OutOfSpaceError(out, "converting into", getattr(error, "needed", None),
                               getattr(error, "free", None))  # fmt: skip
    if isinstance(error, KeyboardInterrupt) or (
        isinstance(error, OSError) and explain_os_error(error) is not None
    ):
        return None
    free = nearly_full(out)
    return OutOfSpaceError(out, "converting into", free=free) if free is not None else None


def _remove_stale_partials(out: str) -> None:
    parent, name = os.path.split(out)
    for partial in glob.glob(os.path.join(parent, f".{glob.escape(name)}.partial-*")):
        pid = partial.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


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


def _convert_to_url(source: Source, fmt: Format, url: str, dtype: str, identity: str,
                    options: dict, overwrite: bool, storage_options: dict[str, Any],
                    jobs: int) -> Store:  # fmt: skip
    """`convert` to an fsspec URL, with the options and identity already resolved: reuse an
    identical store there, else convert into a local staging directory and upload it."""
    if fmt.peer and not fmt.reads_remote:
        raise LoadbenchError(f"{fmt.name} is a peer loader, which reads local stores only")
    files = StoreFiles(url, storage_options)
    existing = upload.existing_identity(files)
    if existing == identity:
        return _reused(open_store(url, storage_options=storage_options))
    occupied = existing is not None or upload.occupied(files)
    if occupied and not overwrite:
        what = "a different store" if existing else "objects that are not a store"
        raise LoadbenchError(
            f"{url} already holds {what}; choose another --out or pass --overwrite"
        )
    with tempfile.TemporaryDirectory(prefix="loadbench-upload-") as tmp:
        local = os.path.join(tmp, "store")
        try:
            _write_atomically(source, fmt, local, dtype, options, identity, jobs)
        except OutOfSpaceError as e:  # the staging folder, not the URL, is full
            raise OutOfSpaceError(
                tmp, f"staging the store for {url} locally in", e.needed, e.free,
                fix="free some space there, or set TMPDIR to a folder with more space",
            ) from None  # fmt: skip
        upload.upload(local, files, replace=occupied)
    return open_store(url, storage_options=storage_options)


def resolve_jobs(jobs: int) -> int:
    """`--jobs`: a number of processes, 0 for one per CPU core."""
    if jobs < 0:
        raise LoadbenchError(
            f"--jobs {jobs}: give a number of processes (1 or more), or 0 for one per CPU core"
        )
    return jobs or os.cpu_count() or 1


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
