"""What the record formats (webdataset, tfrecord) share: shards, payload encoding, indexes.

Both write samples in order into shards of `shard_size` images, each sample's image either as
raw pixels (`npy`/`raw`, any dtype) or encoded (`png`, `jpeg`; uint8 only). Both keep, beside
the shards, an index of where each image's bytes start in which shard, so that a shuffled
`read_batch` can seek (`os.pread`) straight to them; streaming readers ignore the index.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats import codecs
from loadbench.formats.base import Format, Option, SplitReader

INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i8")])

SHARD_OPTION = {"shard_size": Option(10_000, "images per shard", kind=int, minimum=1)}


def encoding_options(raw_name: str) -> dict[str, Option]:
    return {
        "encoding": Option(raw_name, "how an image is stored", choices=(raw_name, "png", "jpeg")),
        **codecs.JPEG_OPTIONS,
        **codecs.PNG_OPTIONS,
    }


class RecordFormat(Format):
    """A sharded record format whose images are raw (any dtype) or PNG/JPEG (uint8)."""

    raw_encoding: ClassVar[str]

    def check(self, dtype: str, options: dict) -> None:
        if options["encoding"] != self.raw_encoding and dtype != "uint8":
            raise LoadbenchError(
                f"{self.name} encoding={options['encoding']} stores uint8 images only; "
                f"use --dtype uint8 or encoding={self.raw_encoding}"
            )
        codecs.check_quality(self.name, options)

    def is_lossy(self, options: dict) -> bool:
        return options["encoding"] == "jpeg"


def encode_image(image: np.ndarray, encoding: str, options: dict) -> tuple[bytes, np.ndarray]:
    """(payload bytes, the image as a reader will decode it) for png/jpeg encodings."""
    data = codecs.encode(image, encoding, options)
    return data, (codecs.decode(data, image.shape[2]) if encoding == "jpeg" else image)


def save_index(root: str, split: str, index: np.ndarray) -> None:
    np.save(os.path.join(root, f"{split}-index.npy"), index)


class BadRecord(ValueError):
    """The bytes an index entry points at are no record of the format (a reader's
    `payload_of` or `decode_raw` says what is wrong; `read_items` names the shard)."""


class ShardReader(SplitReader):
    """Random access through the index: one `pread` per image, shard files opened lazily."""

    shard_names: list[str]
    # What `payload_of` and `decode_payload` raise for damaged bytes (a format adds its
    # library's); `read_items` turns them into the damaged-store error naming the shard.
    record_errors: ClassVar[tuple[type[Exception], ...]] = (ValueError,)  # BadImage, BadRecord

    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        shards = manifest.splits[split].model_extra.get("shards")
        # Shards are files the manifest lists (with their sizes): names that stay in the store.
        if not isinstance(shards, list) or not all(
            isinstance(name, str) and name in manifest.files for name in shards
        ):
            raise self._damaged(f"the manifest's {split} shards", f"{shards!r:.100}")
        self.shard_names = shards
        self.shard_sizes = np.array([manifest.files[name] for name in shards], dtype=np.int64)

    def _open(self):
        rel = f"{self.split}-index.npy"
        index = self._read_npy(rel)
        if index.dtype != INDEX_DTYPE or index.shape != (self.count,):
            raise self._damaged(rel, f"{index.shape} {index.dtype}, not {self.count} entries")
        if problem := _index_problem(index, self.shard_sizes):
            raise self._damaged(rel, problem)
        return {"index": index, "fds": {}}

    def labels(self) -> np.ndarray:
        return self.handle["index"]["label"].astype(np.int64)

    def _fd(self, shard: int) -> int:
        fds = self.handle["fds"]
        if shard not in fds:
            path = self.files.local_path(self.shard_names[shard])
            try:
                fds[shard] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise self._damaged(self.shard_names[shard], e) from None
        return fds[shard]

    def payload(self, entry) -> bytes:
        data = os.pread(self._fd(int(entry["shard"])), int(entry["size"]), int(entry["offset"]))
        if len(data) != entry["size"]:
            raise self._damaged(self._where(entry), "truncated")
        return data

    def decode_payload(self, data: bytes, encoding: str) -> np.ndarray:
        """The image of a record's payload; one of `record_errors` when it is damaged (or
        holds an image of another size than the store's)."""
        if encoding in ("png", "jpeg"):
            return codecs.decode(data, self.image_shape[2], self.image_shape[:2])
        return self.decode_raw(data)

    def decode_raw(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def payload_of(self, data: bytes) -> bytes:
        """The image bytes inside what the index points at (the whole record by default)."""
        return data

    def _where(self, entry) -> str:
        """The shard and the place in it of an index entry's record, for errors."""
        return f"{self.shard_names[int(entry['shard'])]} (record at byte {int(entry['offset'])})"

    def payloads(self, entries) -> list[bytes]:
        """The records of `entries`: `pread`s of local shards (or their cached copies), or the
        byte ranges of all of them fetched concurrently from object storage."""
        if self.files.has_local_files:
            return [self.payload(entry) for entry in entries]
        names = [self.shard_names[int(e["shard"])] for e in entries]
        starts = [int(e["offset"]) for e in entries]
        stops = [int(e["offset"] + e["size"]) for e in entries]
        data = self.files.read_ranges(names, starts, stops)
        for chunk, entry in zip(data, entries, strict=True):
            if len(chunk) != entry["size"]:
                raise self._damaged(self._where(entry), "truncated")
        return data

    def read_items(self, indices):
        entries = self.handle["index"][indices]
        out = self._empty(len(indices))
        encoding = self.options["encoding"]
        for k, data in enumerate(self.payloads(entries)):
            try:
                out[k] = self.decode_payload(self.payload_of(data), encoding)
            except self.record_errors as e:
                raise self._damaged(self._where(entries[k]), e) from None
        return out, entries["label"].astype(np.int64)

    def close(self):
        handle, self._handle = self._handle, None
        if handle is not None and self._pid == os.getpid():
            for fd in handle["fds"].values():
                os.close(fd)


def _index_problem(index: np.ndarray, shard_sizes: np.ndarray) -> str | None:
    """What in a split's index points outside its shards (whose sizes the manifest says): a
    damaged index must not make a read seek, or allocate, where no record is."""
    if not len(index):
        return None
    shard, offset, size = index["shard"], index["offset"], index["size"]
    if shard.min() < 0 or shard.max() >= len(shard_sizes):
        return f"shard numbers {shard.min()}..{shard.max()}, {len(shard_sizes)} shards"
    if offset.min() < 0 or size.min() < 0 or (offset > shard_sizes[shard] - size).any():
        return "records outside their shards"
    return None
