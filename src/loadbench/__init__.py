"""loadbench: which way of storing and loading an image dataset trains a PyTorch classifier
fastest, at what memory cost — measured.

    >>> import loadbench
    >>> source = loadbench.load_source("digits")
    >>> store = loadbench.convert(source, "hdf5", "stores/digits-hdf5")
    >>> images, labels = store.read_batch("train", [0, 1, 2])   # float32 (3, 1, 8, 8), int64 (3,)
    >>> dataset = loadbench.open_store("stores/digits-hdf5").dataset("train")  # a torch Dataset

Heavy modules (torch, h5py, zarr, ...) load on first use, not on import.
"""

from __future__ import annotations

import importlib
from typing import Any

from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.sources import from_arrays, load_source
from loadbench.version import __version__

_LAZY = {
    "open_store": "loadbench.store",
    "Store": "loadbench.store",
    "convert": "loadbench.conversion",
    "convert_many": "loadbench.conversion",
    "verify_path": "loadbench.verify",
    "source_stats": "loadbench.stats",
    "list_formats": "loadbench.formats",
}

__all__ = [
    "CorruptStoreError",
    "LoadbenchError",
    "__version__",
    "from_arrays",
    "load_source",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loadbench' has no attribute {name!r}")
