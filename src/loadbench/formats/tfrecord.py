"""`tfrecord` — TensorFlow's record files of `tf.train.Example`s, written without TensorFlow.

Records are framed as TensorFlow frames them (length, masked CRC32C, payload, masked CRC32C) by
the `tfrecord` package, with the feature names TensorFlow's image pipelines use:
`image/encoded` (raw pixels, PNG or JPEG), `image/format`, `image/class/label`, `image/height`,
`image/width`, `image/channels`, `image/dtype`. So `tf.data.TFRecordDataset` reads the shards,
and so does the `tfrecord` package (a `.index` file per shard is written for its random access).
Reading checks both CRCs of every record.
"""

from __future__ import annotations

import contextlib
import os
import struct

import numpy as np

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

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class TfRecordWriter(SplitWriter):
    def __init__(self, layout: SplitLayout):
        self.layout = layout
        self.options = layout.options
        self.shard_size = self.options["shard_size"]
        self.shards = max(1, -(-layout.count // self.shard_size))
        self.index = np.zeros(layout.end - layout.start, dtype=INDEX_DTYPE)
        self.names: list[str] = []  # the shards this writer wrote, numbered from first_shard
        self.first_shard = layout.start // self.shard_size
        self.writer = None
        self.pos = layout.start

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int:
        return layout.options["shard_size"]

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        save_index(layout.root, layout.split, np.concatenate([part["index"] for part in parts]))
        return {"shards": [name for part in parts for name in part["shards"]]}

    def _shard_writer(self):
        from tfrecord import TFRecordWriter

        shard = self.pos // self.shard_size
        if self.writer is None or shard >= self.first_shard + len(self.names):
            self._close_shard()
            name = f"{self.layout.split}-{shard:05d}-of-{self.shards:05d}.tfrecord"
            self.names.append(name)
            self.writer = TFRecordWriter(os.path.join(self.layout.root, name))
            self.offsets: list[tuple[int, int]] = []
        return self.writer

    def write(self, images, labels):
        h, w, c = self.layout.image_shape
        encoding = self.options["encoding"]
        stored = images if encoding == "raw" else np.empty_like(images)
        for k in range(len(images)):
            if encoding == "raw":
                payload = np.ascontiguousarray(images[k]).tobytes()
            else:
                payload, stored[k] = encode_image(images[k], encoding, self.options)
            writer = self._shard_writer()
            start = writer.file.tell()
            writer.write({
                "image/encoded": (payload, "byte"),
                "image/format": (encoding.encode(), "byte"),
                "image/dtype": (self.layout.dtype.encode(), "byte"),
                "image/class/label": (int(labels[k]), "int"),
                "image/height": (h, "int"),
                "image/width": (w, "int"),
                "image/channels": (c, "int"),
            })  # fmt: skip
            size = writer.file.tell() - start
            shard = self.first_shard + len(self.names) - 1
            self.index[self.pos - self.layout.start] = (shard, start, size, int(labels[k]))
            self.offsets.append((start, size))
            self.pos += 1
        return stored

    def _close_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        # The tfrecord package's index format: "offset length" per record.
        with open(os.path.join(self.layout.root, self.names[-1] + ".index"), "w") as f:
            f.writelines(f"{start} {size}\n" for start, size in self.offsets)
        self.writer = None

    def close(self):
        if self.layout.count == 0:
            self._shard_writer()
        self._close_shard()
        return {"shards": self.names, "index": self.index}  # `join` saves the split's index

    def abort(self):
        if self.writer is not None:
            with contextlib.suppress(OSError):  # its buffer's flush fails again on a full disk
                self.writer.file.close()


class TfRecordReader(ShardReader):
    def payload_of(self, record: bytes) -> bytes:
        from google.protobuf.message import DecodeError
        from tfrecord import example_pb2

        if len(record) < 16:
            raise BadRecord(f"{len(record)} bytes, no record")
        length, length_crc = struct.unpack_from("<QI", record)
        if length != len(record) - 16:
            raise BadRecord(f"a record of {length} bytes in {len(record) - 16} (length damaged)")
        proto = record[12 : 12 + length]
        (data_crc,) = struct.unpack_from("<I", record, 12 + length)
        if masked_crc(record[:8]) != length_crc or masked_crc(proto) != data_crc:
            raise BadRecord("CRC mismatch")
        try:
            example = example_pb2.Example.FromString(proto)
            return example.features.feature["image/encoded"].bytes_list.value[0]
        except (DecodeError, IndexError) as e:  # not an Example, or one without an image
            raise BadRecord(f"no tf.train.Example with an image/encoded: {e}") from None

    def decode_raw(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=DTYPES[self.dtype]).reshape(self.image_shape)


@register_format
class TfRecordFormat(RecordFormat):
    name = "tfrecord"
    summary = "TFRecord shards of tf.train.Example (raw|png|jpeg), CRC-checked, no TensorFlow"
    raw_encoding = "raw"
    options = {**SHARD_OPTION, **encoding_options("raw")}
    writer_class = TfRecordWriter
    reader_class = TfRecordReader
