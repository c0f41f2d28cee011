"""`hdf5` — one HDF5 file (h5py) with a dataset per split: `/train/images`, `/train/labels`.

Contiguous by default; `chunk_images` and `compression` (gzip, lzf) make it chunked. A batch is
read one slice per chunk (HDF5 decodes whole chunks), never with h5py's slow point selection.
The file is opened lazily in each process: h5py handles must not cross a fork.
"""

from __future__ import annotations

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


class Hdf5Writer(SplitWriter):
    def __init__(self, layout: SplitLayout):
        import h5py

        opts = layout.options
        self.file = h5py.File(os.path.join(layout.root, FILE), "a")
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
        return images

    def close(self):
        chunks = self.images.chunks
        self.file.close()
        return {"chunk_images": chunks[0] if chunks else None}


def chunk_images(image_shape, dtype: str, options: dict) -> int | None:
    if options["chunk_images"]:
        return options["chunk_images"]
    if options["compression"] != "none":
        return auto_chunk(image_shape, dtype)  # compression needs chunks
    return None


class Hdf5Reader(ChunkedArrayReader):
    def _open_arrays(self):
        import h5py

        files = self.files
        try:  # a remote file is read through a file object, by byte ranges
            local = files.has_local_files
            file = h5py.File(files.local_path(FILE) if local else files.open(FILE), "r")
            images, labels = file[self.split]["images"], file[self.split]["labels"]
        except (OSError, KeyError) as e:
            raise self._damaged(f"{FILE} cannot be read", e) from None
        if images.shape != (self.count, *self.image_shape):
            raise self._damaged(f"/{self.split}/images has shape {images.shape}", "wrong shape")
        # Labels are small: read once per process instead of once per item.
        return {"file": file, "images": images, "labels": labels[()]}


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
