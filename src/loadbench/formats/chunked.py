"""Reading array files that decode whole chunks (chunked HDF5, Zarr): a batch is read one slice
per chunk, through a per-process cache of decoded chunks."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from loadbench.formats.base import SplitReader
from loadbench.options import Option

CHUNK_CACHE_OPTIONS = {
    "chunk_cache_mb": Option(
        256,
        "MiB of decoded chunks cached per process (zarr, chunked hdf5), 0 = off",
        kind=int,
        minimum=0,
    ),
}


def gather_ranges(indices: np.ndarray, block: int) -> list[tuple[int, int, np.ndarray]]:
    """Group sorted indices by `block`-sized chunk: (first, last + 1, positions) per group.

    Chunked stores decode a whole chunk per read, so a batch is read one chunk-spanning slice
    at a time instead of one image at a time.
    """
    if len(indices) == 0:
        return []
    chunk = indices // block
    cuts = np.flatnonzero(np.diff(chunk)) + 1
    groups = []
    for pos in np.split(np.arange(len(indices)), cuts):
        groups.append((int(indices[pos[0]]), int(indices[pos[-1]]) + 1, pos))
    return groups


def read_by_chunks(indices: np.ndarray, block: int, read_slice, out: np.ndarray) -> np.ndarray:
    """Fill `out` with `read_slice(lo, hi)[indices - lo]`, one slice per chunk touched."""
    for lo, hi, pos in gather_ranges(indices, block):
        out[pos] = read_slice(lo, hi)[indices[pos] - lo]
    return out


class ChunkCache:
    """Decoded chunks by number, the least recently used dropped past `max_bytes`.

    Chunked stores decode a whole chunk to return one image of it; under shuffled per-image
    access without a cache every image costs a chunk decode. Each process (each DataLoader
    worker) has its own cache: it lives in the reader's per-process handle.
    """

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, number: int, load) -> np.ndarray:
        chunk = self.chunks.get(number)
        if chunk is not None:
            self.hits += 1
            self.chunks.move_to_end(number)
            return chunk
        self.misses += 1
        chunk = load()
        if chunk.nbytes <= self.max_bytes:
            self.chunks[number] = chunk
            self.bytes += chunk.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self.chunks.popitem(last=False)
                self.bytes -= dropped.nbytes
        return chunk

    def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total if total else None,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
        }


DEFAULT_CHUNK_CACHE_BYTES = CHUNK_CACHE_OPTIONS["chunk_cache_mb"].default << 20
# The most images per chunk a manifest may say (more than any split holds); a damaged manifest's
# larger numbers overflow the int64 arithmetic that groups indices by chunk.
MAX_CHUNK_IMAGES = 1 << 40


class ChunkedArrayReader(SplitReader):
    """Readers of array files that decode whole chunks (HDF5, Zarr): one slice per chunk.

    `_open_arrays` returns {"images": array-like, "labels": ndarray, ...}; anything in it with
    a `close()` (the file, the store) is closed with the reader. Stores written in chunks read
    through a `ChunkCache` of `cache_bytes` per process (0 turns it off); contiguous ones
    (unchunked HDF5) read slices of `default_chunk` images and cache nothing.
    """

    read_errors: ClassVar[tuple[type[Exception], ...]] = (OSError,)
    cache_bytes: int = DEFAULT_CHUNK_CACHE_BYTES

    def __init__(self, root: str, manifest: Any, split: str, default_chunk: int = 256):
        super().__init__(root, manifest, split)
        stored_chunk = manifest.splits[split].model_extra.get("chunk_images")
        if stored_chunk is not None and not (
            type(stored_chunk) is int and 0 <= stored_chunk <= MAX_CHUNK_IMAGES
        ):  # a damaged manifest: the chunk size is what reads are cut by
            raise self._damaged(f"the manifest's {split} chunk_images", repr(stored_chunk))
        self.chunked = bool(stored_chunk)
        # Contiguous arrays are still read in slices of `default_chunk` images, so one sparse
        # batch does not pull the whole span between its first and last index.
        self.chunk = stored_chunk or default_chunk

    @property
    def block_images(self) -> int | None:
        return self.chunk if self.chunked else None

    def _open(self) -> dict[str, Any]:
        handle = self._open_arrays()
        cached = self.chunked and self.cache_bytes > 0
        handle["cache"] = ChunkCache(self.cache_bytes) if cached else None
        return handle

    def _open_arrays(self) -> dict[str, Any]:
        raise NotImplementedError

    def images_path(self) -> str:
        """Where the split's images are in the store, for errors."""
        return f"{self.split}/images"

    def cache_stats(self) -> dict[str, Any] | None:
        """This process's chunk-cache counters (None: no cache, or nothing read yet)."""
        if self._handle is None or self._pid != os.getpid() or self._handle["cache"] is None:
            return None
        return self._handle["cache"].stats()

    def labels(self) -> np.ndarray:
        return np.asarray(self.handle["labels"], dtype=np.int64)

    def _slice(self, lo: int, hi: int) -> np.ndarray:
        try:
            return self.handle["images"][lo:hi]
        except self.read_errors as e:
            raise self._damaged(f"{self.images_path()} cannot be read", e) from None

    def _chunk(self, number: int) -> np.ndarray:
        lo = number * self.chunk
        return self.handle["cache"].get(
            number, lambda: self._slice(lo, min(lo + self.chunk, self.count))
        )

    def read(self, index: int) -> tuple[np.ndarray, int]:
        h = self.handle
        index = self._check_index(index)
        if h["cache"] is None:
            return self._slice(index, index + 1)[0], int(h["labels"][index])
        number = index // self.chunk
        return self._chunk(number)[index - number * self.chunk].copy(), int(h["labels"][index])

    def read_items(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = self.handle
        out = self._empty(len(indices))
        if h["cache"] is None:
            read_by_chunks(indices, self.chunk, self._slice, out)
        else:
            for lo, _, pos in gather_ranges(indices, self.chunk):
                number = lo // self.chunk
                out[pos] = self._chunk(number)[indices[pos] - number * self.chunk]
        return out, h["labels"][indices]
