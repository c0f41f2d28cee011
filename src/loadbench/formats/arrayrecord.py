"""`arrayrecord` — ArrayRecord shards (Grain's record files), written and read with the
`array_record` package.

Layout of a split:
- `<split>-NNNNN-of-MMMMM.array_record`: shards of `shard_size` records (record i of the split is
  record i % shard_size of shard i // shard_size), each written by
  `ArrayRecordWriter(path, "group_size:1,<compression>")`. `group_size:1` puts every record in a
  chunk of its own, which is what the array_record and Grain documentation ask of files read in
  random order (Grain logs an error for any other group size); `compression` is array_record's
  default, zstd:3, or `none`.
- `<split>-labels.npy`: the labels, int64 in split order, so that `labels()` reads no record.

A record is 16 bytes of header, little-endian, then the image:

    offset  size  field
    0       4     magic b"LBAR"
    4       4     CRC32C (Castagnoli) of every byte from offset 8 to the end (label and image)
    8       8     label, int64
    16      ...   the image: raw pixels (H, W, C, C order, the storage dtype) for
                  `encoding=raw`, or a PNG or JPEG file

so a Grain user reads it with `grain.sources.ArrayRecordDataSource(shards)` and a `map` that
splits it (the `grain` peer does exactly that). Riegeli checks a hash of every chunk as well.

Reading: one `ArrayRecordReader` per shard, opened lazily in the process that reads, with the
options array_record documents for random access (no readahead, no thread pool); a batch is one
`read(positions)` per shard.

array_record reads real files through its own file layer (riegeli), not Python file objects, so
a store on object storage is read through its read-through copy (`--cache-dir`).
https://github.com/google/array_record
"""

from __future__ import annotations

import contextlib
import os
import struct

import numpy as np

from loadbench.errors import CorruptStoreError
from loadbench.formats import codecs
from loadbench.formats.base import Option, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.formats.pixels import DTYPES
from loadbench.formats.records import (
    SHARD_OPTION,
    BadRecord,
    RecordFormat,
    encode_image,
    encoding_options,
)

MAGIC = b"LBAR"
HEADER = struct.Struct("<4sIq")  # magic, CRC32C of the rest, label
COMPRESSION = {"zstd": "zstd:3", "none": "uncompressed"}
# What the array_record package (and Grain's source over it) raises for a file it cannot open
# or read: its C++ status as a RuntimeError, a ValueError for what it finds wrong itself.
READ_ERRORS = (RuntimeError, ValueError, OSError)
# array_record's options for random access, as its reader's documentation gives them: no
# readahead, and no parallel reads on its process-wide thread pool. That pool does not survive a
# fork: a DataLoader worker forked after the parent read through it crashed (SIGSEGV) in it.
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
# Readers a forked process inherited from its parent, never destroyed in it (see `_open`).
_INHERITED: list = []


def shard_name(split: str, shard: int, shards: int) -> str:
    return f"{split}-{shard:05d}-of-{shards:05d}.array_record"


def labels_name(split: str) -> str:
    return f"{split}-labels.npy"


def writer_options(options: dict) -> str:
    return f"group_size:1,{COMPRESSION[options['compression']]}"


def pack_record(label: int, image: bytes) -> bytes:
    """One record: header (magic, CRC32C, label), then the image bytes."""
    import crc32c

    body = struct.pack("<q", label) + image
    return MAGIC + struct.pack("<I", crc32c.crc32c(body)) + body


def unpack_record(record: bytes) -> tuple[memoryview, int]:
    """(image bytes, label) of a record; BadRecord unless its magic and CRC are right."""
    import crc32c

    if len(record) < HEADER.size or record[:4] != MAGIC:
        raise BadRecord(f"a record of {len(record)} bytes without the LBAR header")
    _, crc, label = HEADER.unpack_from(record)
    view = memoryview(record)
    if crc32c.crc32c(view[8:]) != crc:
        raise BadRecord("CRC mismatch")
    return view[HEADER.size :], label


class RecordDecoder:
    """A record's bytes -> (stored image H, W, C, label); BadRecord or codecs.BadImage when
    damaged. Picklable: the `grain` peer runs it in Grain's worker processes."""

    def __init__(self, image_shape, dtype: str, encoding: str):
        self.image_shape, self.dtype, self.encoding = tuple(image_shape), dtype, encoding
        self.nbytes = int(np.prod(self.image_shape)) * np.dtype(DTYPES[dtype]).itemsize

    def __call__(self, record: bytes) -> tuple[np.ndarray, int]:
        data, label = unpack_record(record)
        if self.encoding in ("png", "jpeg"):
            return codecs.decode(bytes(data), self.image_shape[2], self.image_shape[:2]), label
        if len(data) != self.nbytes:
            raise BadRecord(f"an image of {len(data)} bytes, not {self.nbytes}")
        return np.frombuffer(data, dtype=DTYPES[self.dtype]).reshape(self.image_shape), label


class ArrayRecordShardWriter(SplitWriter):
    def __init__(self, layout: SplitLayout):
        self.layout, self.options = layout, layout.options
        self.shard_size = self.options["shard_size"]
        self.shards = max(1, -(-layout.count // self.shard_size))
        self.first_shard = layout.start // self.shard_size
        self.names: list[str] = []  # the shards this writer wrote, numbered from first_shard
        self.labels = np.zeros(layout.end - layout.start, dtype=np.int64)
        self.writer = None
        self.pos = layout.start

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int:
        return layout.options["shard_size"]

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        labels = np.concatenate([part["labels"] for part in parts])
        np.save(os.path.join(layout.root, labels_name(layout.split)), labels)
        return {"shards": [name for part in parts for name in part["shards"]]}

    def _shard_writer(self):
        from array_record.python.array_record_module import ArrayRecordWriter

        shard = self.pos // self.shard_size
        if self.writer is None or shard >= self.first_shard + len(self.names):
            self._close_shard()
            name = shard_name(self.layout.split, shard, self.shards)
            path = os.path.join(self.layout.root, name)
            # Made here first: array_record reports a place it cannot write only as a message;
            # Python's open raises the OSError (read-only, forbidden, full) that loadbench says.
            open(path, "wb").close()
            self.names.append(name)
            self.writer = ArrayRecordWriter(path, writer_options(self.options))
        return self.writer

    def write(self, images, labels):
        encoding = self.options["encoding"]
        stored = images if encoding == "raw" else np.empty_like(images)
        for k in range(len(images)):
            if encoding == "raw":
                payload = np.ascontiguousarray(images[k]).tobytes()
            else:
                payload, stored[k] = encode_image(images[k], encoding, self.options)
            self._shard_writer().write(pack_record(int(labels[k]), payload))
            self.labels[self.pos - self.layout.start] = int(labels[k])
            self.pos += 1
        return stored

    def _close_shard(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def close(self):
        if self.layout.count == 0:
            self._shard_writer()  # an empty split is one empty shard
        self._close_shard()
        return {"shards": self.names, "labels": self.labels}  # `join` saves the labels

    def abort(self):
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(*READ_ERRORS):  # its flush fails again on a full disk
                writer.close()


class ArrayRecordReader(SplitReader):
    """Random access through array_record's reader, one per shard, opened lazily."""

    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        shards = manifest.splits[split].model_extra.get("shards")
        # One shard holds the whole split whenever shard_size >= count: the same shards, and no
        # int64 overflow in `indices // shard_size` for a huge (or damaged) value.
        self.shard_size = min(self.options["shard_size"], max(1, self.count))
        # Shards are files the manifest lists: names that stay in the store, as many as the
        # split's count needs.
        if (
            not isinstance(shards, list)
            or not all(isinstance(name, str) and name in manifest.files for name in shards)
            or len(shards) != max(1, -(-self.count // self.shard_size))
        ):
            raise self._damaged(f"the manifest's {split} shards", f"{shards!r:.100}")
        self.shard_names = shards
        self.decoder = RecordDecoder(self.image_shape, self.dtype, self.options["encoding"])

    def _open(self):
        if self._handle is not None and self._pid != os.getpid():
            # Forked from a process that had read: its C++ readers are the parent's, kept and
            # not destroyed here. (Forks after array_record was used can still crash: see
            # ARRAY_RECORD_FORK in tests/conftest.py.)
            _INHERITED.append(self._handle)
        rel = labels_name(self.split)
        labels = self._read_npy(rel)
        if labels.dtype != np.int64 or labels.shape != (self.count,):
            raise self._damaged(rel, f"{labels.shape} {labels.dtype}, not {self.count} labels")
        return {"labels": labels, "readers": {}}

    def labels(self) -> np.ndarray:
        return self.handle["labels"].copy()

    def shard_records(self, shard: int) -> int:
        """How many records shard `shard` holds."""
        return min(self.shard_size, self.count - shard * self.shard_size) if self.count else 0

    def _reader(self, shard: int):
        readers = self.handle["readers"]
        if shard not in readers:
            from array_record.python import array_record_module

            name = self.shard_names[shard]
            path = self.files.local_path(name)  # a remote store: its read-through copy
            try:
                reader = array_record_module.ArrayRecordReader(path, READER_OPTIONS)
                records = reader.num_records() if reader.ok() else None
            except READ_ERRORS as e:
                raise self._damaged(name, e) from None
            if records != self.shard_records(shard):
                reader.close()
                found = "no ArrayRecord file" if records is None else f"{records} records"
                raise self._damaged(name, f"{found}, not {self.shard_records(shard)}")
            readers[shard] = reader
        return readers[shard]

    def shard_damaged(self, shard: int, error: Exception) -> CorruptStoreError:
        """The damaged-store error naming shard number `shard`."""
        return self._damaged(self.shard_names[shard], error)

    def read_records(self, shard: int, positions: list[int]) -> list[bytes]:
        """The records at `positions` of a shard, in one read."""
        try:
            return self._reader(shard).read(positions)
        except READ_ERRORS as e:
            raise self.shard_damaged(shard, e) from None

    def decode(self, record: bytes, shard: int) -> tuple[np.ndarray, int]:
        """A record of shard `shard` as (stored image, label), or the damaged-store error."""
        try:
            return self.decoder(record)
        except (BadRecord, codecs.BadImage) as e:
            raise self.shard_damaged(shard, e) from None

    def read_items(self, indices):
        out = self._empty(len(indices))
        labels = np.empty(len(indices), dtype=np.int64)
        shards = indices // self.shard_size
        bounds = np.flatnonzero(np.diff(shards)) + 1  # indices are sorted: runs of one shard
        for run in np.split(np.arange(len(indices)), bounds):
            if not len(run):
                continue
            shard = int(shards[run[0]])
            positions = (indices[run] - shard * self.shard_size).tolist()
            for k, record in zip(run, self.read_records(shard, positions), strict=True):
                out[k], labels[k] = self.decode(record, shard)
        return out, labels

    def close(self):
        handle, self._handle = self._handle, None
        if handle is not None and self._pid == os.getpid():
            for reader in handle["readers"].values():
                with contextlib.suppress(*READ_ERRORS):
                    reader.close()


@register_format
class ArrayRecordFormat(RecordFormat):
    name = "arrayrecord"
    summary = "ArrayRecord shards (Grain's format, group_size:1) of raw|png|jpeg + label records"
    raw_encoding = "raw"
    options = {
        **SHARD_OPTION,
        **encoding_options("raw"),
        "compression": Option(
            "zstd", "chunk compression (zstd:3, array_record's default)", choices=tuple(COMPRESSION)
        ),
    }
    writer_class = ArrayRecordShardWriter
    reader_class = ArrayRecordReader
    requires = ("array_record",)
    install = "array-record"

    def needs_local_file(self, options):
        return True
