"""`zarr` — a Zarr v3 group with an array per split (`train/images`), in a directory or a zip.

Chunks of `chunk_images` images (default: about 1 MiB each), optionally compressed (Blosc zstd or
lz4, Zstandard, gzip). Every read decodes whole chunks, so a batch is read one slice per chunk;
one image at a time decodes a whole chunk per image (the cost the benchmark shows).
"""

from __future__ import annotations

import lzma
import os
import shutil
import zipfile
import zlib

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats.base import Format, Option, SplitLayout, SplitWriter, register_format
from loadbench.formats.chunked import ChunkedArrayReader
from loadbench.formats.hdf5 import auto_chunk
from loadbench.formats.pixels import DTYPES
from loadbench.remote import join

DIRECTORY = "data.zarr"
ZIP = "data.zarr.zip"
COMPRESSIONS = ("none", "blosc-zstd", "blosc-lz4", "zstd", "gzip")
DEFAULT_LEVEL = {"blosc-zstd": 5, "blosc-lz4": 5, "zstd": 3, "gzip": 5}


def compressors(name: str, level: int | None, itemsize: int):
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    level = DEFAULT_LEVEL.get(name) if level is None else level
    if name == "none":
        return None
    if name.startswith("blosc-"):
        shuffle = "bitshuffle" if itemsize == 1 else "shuffle"
        return BloscCodec(
            cname=name[len("blosc-") :], clevel=level, shuffle=shuffle, typesize=itemsize
        )
    if name == "zstd":
        return ZstdCodec(level=level)
    return GzipCodec(level=level)


class ZarrWriter(SplitWriter):
    """Buffers to whole chunks, so no chunk is written (and compressed) twice."""

    def __init__(self, layout: SplitLayout):
        import zarr

        self.chunk = layout.options["chunk_images"] or auto_chunk(layout.image_shape, layout.dtype)
        group = zarr.open_group(os.path.join(layout.root, DIRECTORY), mode="r+")
        self.images = group[layout.split]["images"]  # made by `prepare`
        self.all_labels = np.empty(layout.end - layout.start, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.pos = layout.start  # images written to the array
        self.received = 0  # images handed to write()

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int:
        return _array_chunk(layout)  # writers of whole chunks never write the same chunk

    @classmethod
    def prepare(cls, layout: SplitLayout) -> None:
        import zarr

        opts = layout.options
        group = zarr.open_group(os.path.join(layout.root, DIRECTORY), mode="a").require_group(
            layout.split
        )
        dtype = DTYPES[layout.dtype]
        group.create_array(
            "images",
            shape=(layout.count, *layout.image_shape),
            chunks=(_array_chunk(layout), *layout.image_shape),
            dtype=dtype,
            compressors=compressors(
                opts["compression"], opts["compression_level"], np.dtype(dtype).itemsize
            ),
            fill_value=0,
        )
        group.create_array(
            "labels", shape=(layout.count,), chunks=(max(layout.count, 1),), dtype=np.int64
        )

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        import zarr

        group = zarr.open_group(os.path.join(layout.root, DIRECTORY), mode="r+")
        group[layout.split]["labels"][:] = np.concatenate([part["labels"] for part in parts])
        return {"chunk_images": parts[0]["chunk_images"]}

    def write(self, images, labels):
        self.all_labels[self.received : self.received + len(labels)] = labels
        self.received += len(labels)
        self.pending.append(images)
        self.pending_n += len(images)
        if self.pending_n >= self.chunk:
            self._flush(whole_chunks=True)
        return images

    def _flush(self, whole_chunks: bool) -> None:
        if not self.pending_n:
            return
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n = (len(data) // self.chunk) * self.chunk if whole_chunks else len(data)
        self.images[self.pos : self.pos + n] = data[:n]
        self.pos += n
        rest = data[n:]
        self.pending = [rest] if len(rest) else []
        self.pending_n = len(rest)

    def close(self):
        self._flush(whole_chunks=False)
        return {"chunk_images": self.chunk, "labels": self.all_labels}  # `join` writes labels


def _array_chunk(layout: SplitLayout) -> int:
    chunk = layout.options["chunk_images"] or auto_chunk(layout.image_shape, layout.dtype)
    return min(chunk, max(layout.count, 1))


# What zarr raises for damaged bytes: its errors (ValueError, OSError and IndexError kinds), JSON
# metadata that does not parse (ValueError) or holds other keys and types than it expects (its
# metadata classes are built with `cls(**data)`: TypeError, KeyError), numcodecs' decompressors
# (RuntimeError), and a damaged zip (zipfile's BadZipFile, EOFError for a member cut short, and
# its decompressors' errors for a member whose header says it is compressed).
ZARR_ERRORS = (
    OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError, EOFError,
    zipfile.BadZipFile, zlib.error, lzma.LZMAError,
)  # fmt: skip


class ZarrReader(ChunkedArrayReader):
    read_errors = ZARR_ERRORS

    def images_path(self) -> str:
        return f"{ZIP if self.options['store'] == 'zip' else DIRECTORY}/{self.split}/images"

    def _open_arrays(self):
        import zarr
        from zarr.storage import ZipStore

        zipped = self.options["store"] == "zip"
        images_path = self.images_path()
        labels_path = images_path.removesuffix("images") + "labels"
        try:
            if zipped:  # a remote zip is read from its read-through copy
                store = ZipStore(self.files.local_path(ZIP), mode="r")
            else:  # a directory, or fsspec's store for object storage
                store = zarr_store(self.files, DIRECTORY)
            group = zarr.open_group(store, mode="r")
            images = group[self.split]["images"]
        except ZARR_ERRORS as e:
            raise self._damaged(f"{images_path} cannot be opened", e) from None
        try:
            labels = group[self.split]["labels"][:]
        except ZARR_ERRORS as e:
            raise self._damaged(f"{labels_path} cannot be read", e) from None
        if not isinstance(images, zarr.Array) or images.shape != (self.count, *self.image_shape):
            raise self._damaged(images_path, f"shape {getattr(images, 'shape', None)}, wrong shape")
        if images.dtype != DTYPES[self.dtype]:
            raise self._damaged(images_path, f"dtype {images.dtype}")
        if labels.shape != (self.count,) or labels.dtype.kind not in "iu":
            raise self._damaged(labels_path, f"{labels.shape} {labels.dtype}, not labels")
        return {"store": store, "images": images, "labels": labels}


@register_format
class ZarrFormat(Format):
    name = "zarr"
    summary = "Zarr v3 arrays, chunked (+ Blosc/Zstd/gzip), in a directory or a zip"
    writer_class = ZarrWriter
    reader_class = ZarrReader
    options = {
        "chunk_images": Option(
            None, "images per chunk", kind=int, minimum=1, shown="about 1 MiB each"
        ),
        "compression": Option("none", "chunk codec", choices=COMPRESSIONS),
        "compression_level": Option(None, "codec level", kind=int, minimum=0, shown="per codec"),
        "store": Option("dir", "a directory or one zip file", choices=("dir", "zip")),
    }

    def needs_local_file(self, options):
        return options.get("store") == "zip"  # zarr reads a zip through a real file

    def check(self, dtype, options):
        if options["compression_level"] is not None and options["compression"] == "none":
            raise LoadbenchError("zarr option compression_level needs a compression")

    def finalize(self, root, options):
        if options["store"] != "zip":
            return
        directory = os.path.join(root, DIRECTORY)
        # Chunks are stored, not deflated again: zarr reads members in place.
        with zipfile.ZipFile(
            os.path.join(root, ZIP), "w", zipfile.ZIP_STORED, allowZip64=True
        ) as z:
            for dirpath, dirs, names in os.walk(directory):
                dirs.sort()  # members in one order, whichever order parallel writers made them
                for name in sorted(names):
                    path = os.path.join(dirpath, name)
                    z.write(path, os.path.relpath(path, directory))
        shutil.rmtree(directory)


# -- reading a store's zarr group wherever it is -------------------------------------------------


def zarr_store(files, rel: str):
    """A read-only zarr store of the directory `rel` of a store: a local directory, fsspec's
    store in place on object storage, or the store's read-through copies (`files.cached`)."""
    from zarr.storage import FsspecStore, LocalStore

    if not files.remote:
        return LocalStore(os.path.join(files.root, rel), read_only=True)
    if not files.cached:  # zarr makes its own asynchronous filesystem
        with files.errors():
            return FsspecStore.from_url(
                join(files.root, rel), storage_options=files.options, read_only=True
            )
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    fs = AsyncFileSystemWrapper(_cache_filesystem(files), asynchronous=True)
    return FsspecStore(fs, read_only=True, path=rel)


def _cache_filesystem(files):
    """A read-only fsspec view of a store through its read-through copies, for zarr: paths are
    relative to the store's root; a missing object is FileNotFoundError. (The class is made on
    first use: fsspec is imported only by remote stores.)"""
    global _CACHE_FS
    if _CACHE_FS is None:
        _CACHE_FS = _cache_filesystem_class()
    return _CACHE_FS(files)


_CACHE_FS = None


def _cache_filesystem_class():
    from fsspec import AbstractFileSystem

    class CacheFileSystem(AbstractFileSystem):
        protocol = "loadbench-cache"
        cachable = False

        def __init__(self, files):
            super().__init__()
            self.files = files

        def _open(self, path, mode="rb", **kwargs):
            if mode != "rb":
                raise PermissionError("read-only")
            try:
                return open(self.files.local_path(path.lstrip("/")), "rb")
            except LoadbenchError as e:
                if "not found" in str(e):
                    raise FileNotFoundError(path) from None
                raise

        def info(self, path, **kwargs):
            with self.files.errors():
                info = self.files.fs.info(self.files.remote_path(path.lstrip("/")))
            return {**info, "name": path}

        def ls(self, path, detail=True, **kwargs):
            base = self.files.remote_path("").rstrip("/")
            with self.files.errors():
                found = self.files.fs.ls(self.files.remote_path(path.lstrip("/")), detail=True)
            out = [{**f, "name": f["name"][len(base) + 1 :]} for f in found]
            return out if detail else [f["name"] for f in out]

    return CacheFileSystem
