"""`hdf5` — one HDF5 file (h5py) with a dataset per split: `/train/images`, `/train/labels`.

Contiguous by default; `chunk_images` and `compression` (gzip, lzf) make it chunked. A batch is
read one slice per chunk (HDF5 decodes whole chunks), never with h5py's slow point selection.
The file is opened lazily in each process: h5py handles must not cross a fork.
"""

from __future__ import annotations

import io
import os

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats.base import Format, Option, SplitLayout, SplitWriter, register_format
from loadbench.formats.chunked import ChunkedArrayReader
from loadbench.formats.pixels import DTYPES

FILE = "data.h5"


def auto_chunk(image_shape, dtype: str, target_bytes: int = 1 << 20) -> int:
    """Images per chunk for about `target_bytes` per chunk, a power of two (1..1024)."""
    per_image = int(np.prod(image_shape)) * np.dtype(DTYPES[dtype]).itemsize
    n = max(1, min(1024, target_bytes // per_image))
    return 1 << (n.bit_length() - 1)


class _Sink(io.RawIOBase):
    """The HDF5 file as h5py's file-object driver writes it, keeping the first write error.

    HDF5 does not survive a failed write: its next flush fails again, and closing the file
    (or the finalizers at exit) crashed with SIGSEGV on a full disk. So a write that fails is
    remembered, later ones are skipped as if done, HDF5 closes a file it believes complete,
    and the writer raises the remembered error (`failed`); the partial store is removed.
    """

    def __init__(self, path: str):
        super().__init__()
        mode = "r+b" if os.path.exists(path) else "w+b"
        self.file = open(path, mode, buffering=0)  # noqa: SIM115 (closed by `close`)
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                return self.file.write(data)
            except OSError as e:
                self.error = e
        self.file.seek(size, os.SEEK_CUR)
        return size

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.file.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return self.tell() if size is None else size

    def failed(self) -> None:
        """Raise the first write error, if there was one."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.file.close()
        super().close()


class Hdf5Writer(SplitWriter):
    def __init__(self, layout: SplitLayout):
        import h5py

        opts = layout.options
        self.sink = _Sink(os.path.join(layout.root, FILE))
        self.file = h5py.File(self.sink, "a")
        group = self.file.create_group(layout.split)
        kwargs = {}
        chunk = chunk_images(layout.image_shape, layout.dtype, opts)
        if chunk:
            kwargs["chunks"] = (min(chunk, max(layout.count, 1)), *layout.image_shape)
        if opts["compression"] == "gzip":
            kwargs.update(compression="gzip", compression_opts=opts["compression_level"] or 4)
        elif opts["compression"] == "lzf":
            kwargs["compression"] = "lzf"
        self.images = group.create_dataset(
            "images",
            shape=(layout.count, *layout.image_shape),
            dtype=DTYPES[layout.dtype],
            **kwargs,
        )
        self.labels = group.create_dataset("labels", shape=(layout.count,), dtype=np.int64)
        self.pos = 0

    def write(self, images, labels):
        n = len(images)
        self.images[self.pos : self.pos + n] = images
        self.labels[self.pos : self.pos + n] = labels
        self.pos += n
        self.sink.failed()
        return images

    def close(self):
        chunks = self.images.chunks
        self.file.close()
        self.sink.close()
        self.sink.failed()
        return {"chunk_images": chunks[0] if chunks else None}

    def abort(self):
        if self.file:  # closes what HDF5 wrote; writes that would fail are skipped (`_Sink`)
            self.file.close()
        self.sink.close()


def chunk_images(image_shape, dtype: str, options: dict) -> int | None:
    if options["chunk_images"]:
        return options["chunk_images"]
    if options["compression"] != "none":
        return auto_chunk(image_shape, dtype)  # compression needs chunks
    return None


# What h5py raises for a damaged file: HDF5's errors as OSError (most), KeyError (a name that is
# not there), ValueError and TypeError (a damaged dataspace or datatype it cannot select or
# convert), RuntimeError (NotImplementedError among them: a filter or layout it does not know).
HDF5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


class Hdf5Reader(ChunkedArrayReader):
    read_errors = HDF5_ERRORS

    def images_path(self) -> str:
        return f"{FILE} /{self.split}/images"

    def _open_arrays(self):
        import h5py

        files = self.files
        try:  # a remote file is read through a file object, by byte ranges
            local = files.has_local_files
            file = h5py.File(files.local_path(FILE) if local else files.open(FILE), "r")
            images, labels = file[self.split]["images"], file[self.split]["labels"]
            # Labels are small: read once per process instead of once per item.
            labels = labels[()] if isinstance(labels, h5py.Dataset) else None
        except HDF5_ERRORS as e:
            raise self._damaged(f"{FILE} cannot be read", e) from None
        if not isinstance(images, h5py.Dataset) or images.shape != (self.count, *self.image_shape):
            shape = getattr(images, "shape", None)
            raise self._damaged(self.images_path(), f"shape {shape}, wrong shape")
        if images.dtype != DTYPES[self.dtype]:
            raise self._damaged(self.images_path(), f"dtype {images.dtype}")
        if getattr(labels, "shape", None) != (self.count,) or labels.dtype.kind not in "iu":
            what = f"{labels.shape} {labels.dtype}" if labels is not None else "no dataset"
            raise self._damaged(f"{FILE} /{self.split}/labels", f"{what}, not labels")
        return {"file": file, "images": images, "labels": labels}


@register_format
class Hdf5Format(Format):
    name = "hdf5"
    summary = "HDF5 file (h5py), /<split>/images; contiguous or chunked + gzip/lzf"
    writer_class = Hdf5Writer
    reader_class = Hdf5Reader
    options = {
        "chunk_images": Option(
            None,
            "images per chunk",
            kind=int,
            minimum=1,
            shown="contiguous; about 1 MiB when compressed",
        ),
        "compression": Option("none", "chunk compression", choices=("none", "gzip", "lzf")),
        "compression_level": Option(None, "gzip level 0-9", kind=int, minimum=0, shown="4"),
    }

    def check(self, dtype, options):
        level = options["compression_level"]
        if level is not None and (options["compression"] != "gzip" or level > 9):
            raise LoadbenchError("hdf5 option compression_level is 0-9 and needs compression=gzip")
