"""`webdataset` — POSIX tar shards in the WebDataset convention, written with its `ShardWriter`.

Each sample is `<key>.npy` (raw pixels, any dtype) or `<key>.png` / `<key>.jpg`, plus `<key>.cls`
(the label as text), so the `webdataset` library streams the shards as they are. For random
access an index of member offsets is kept beside the shards.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile

import numpy as np

from loadbench.formats import codecs
from loadbench.formats.base import SplitLayout, SplitWriter, register_format
from loadbench.formats.pixels import DTYPES
from loadbench.formats.records import (
    INDEX_DTYPE,
    SHARD_OPTION,
    BadRecord,
    RecordFormat,
    ShardReader,
    encode_image,
    encoding_options,
    save_index,
)
from loadbench.storefiles import NPY_ERRORS, NPY_HEAD, npy_header

EXTENSION = {"npy": "npy", "png": "png", "jpeg": "jpg"}


class WebDatasetWriter(SplitWriter):
    def __init__(self, layout: SplitLayout):
        import webdataset as wds

        self.layout = layout
        self.encoding = layout.options["encoding"]
        self.pattern = os.path.join(layout.root, f"{layout.split}-%06d.tar")
        # A whole-second mtime: a float one makes tarfile add a 1 KiB pax header per member.
        # Zero, so that the same data gives byte-identical shards.
        self.shards: list[str] = []  # the shards this writer wrote, in order
        self.first_shard = layout.start // layout.options["shard_size"]
        self.writer = wds.ShardWriter(
            self.pattern, maxcount=layout.options["shard_size"], maxsize=1 << 62, verbose=0,
            mtime=0, start_shard=self.first_shard,
            post=lambda path: self.shards.append(os.path.basename(path)),
        )  # fmt: skip
        self.pos = layout.start

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int:
        return layout.options["shard_size"]  # whole shards, numbered from the range's start

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        save_index(layout.root, layout.split, np.concatenate([part["index"] for part in parts]))
        return {"shards": [name for part in parts for name in part["shards"]]}

    def write(self, images, labels):
        ext = EXTENSION[self.encoding]
        stored = images
        if self.encoding != "npy":
            stored = np.empty_like(images)
        for k in range(len(images)):
            if self.encoding == "npy":
                payload = _npy_bytes(images[k])
            else:
                payload, stored[k] = encode_image(images[k], self.encoding, self.layout.options)
            self.writer.write(
                {"__key__": f"{self.pos + k:08d}", ext: payload, "cls": str(int(labels[k]))}
            )
        self.pos += len(images)
        return stored

    def close(self):
        self.writer.close()
        index = _scan(self.layout.root, self.shards, self.first_shard)
        return {"shards": self.shards, "index": index}  # `join` saves the split's index

    def abort(self):
        """Close the open shard's file without finishing the tar: tarfile's stream would
        otherwise flush it again when collected, and print a traceback as it fails."""
        shard = getattr(self.writer, "tarstream", None)  # webdataset's TarWriter
        if shard is None:
            return
        shard.tarstream.closed = True  # the TarFile
        shard.tarstream.fileobj.closed = True  # its _Stream, whose __del__ would close it
        if shard.own_fileobj is not None:
            with contextlib.suppress(OSError):
                shard.own_fileobj.close()
        self.writer.tarstream = None


def _npy_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image, allow_pickle=False)
    return buffer.getvalue()


def _scan(root: str, shards: list[str], first: int = 0) -> np.ndarray:
    """Offset and size of every sample's image member, and its label, in sample order; the
    shards are numbered from `first`."""
    rows = []
    for number, name in enumerate(shards, start=first):
        images, labels = {}, {}
        with tarfile.open(os.path.join(root, name)) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "cls":
                    labels[key] = int(tar.extractfile(member).read())
                elif ext in EXTENSION.values():
                    images[key] = (member.offset_data, member.size)
        for key in sorted(images):
            offset, size = images[key]
            rows.append((number, offset, size, labels[key]))
    return np.array(rows, dtype=INDEX_DTYPE)


class WebDatasetReader(ShardReader):
    record_errors = (*NPY_ERRORS, codecs.BadImage)  # a `.npy` member's header is a literal

    def decode_raw(self, data: bytes) -> np.ndarray:
        """A `.npy` member's image: its header must say the store's image shape and dtype (it is
        checked before the pixels are read), and the bytes after it hold them."""
        shape, dtype, fortran, offset = npy_header(data[:NPY_HEAD], "a .npy member")
        if shape != tuple(self.image_shape) or dtype != DTYPES[self.dtype] or fortran:
            raise BadRecord(f"a .npy of {shape} {dtype}, not {self.image_shape} {self.dtype}")
        return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


@register_format
class WebDatasetFormat(RecordFormat):
    name = "webdataset"
    summary = "WebDataset tar shards (<key>.npy|png|jpg + <key>.cls), streamable"
    raw_encoding = "npy"
    options = {**SHARD_OPTION, **encoding_options("npy")}
    writer_class = WebDatasetWriter
    reader_class = WebDatasetReader
