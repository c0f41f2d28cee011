"""Storage formats: one module each, registered by name. `get_format("hdf5")` returns one.

Heavy libraries (h5py, zarr, lmdb, webdataset) are imported inside each format's writer and
reader, so listing formats or running `loadbench --help` imports none of them.
"""

from __future__ import annotations

import importlib

from loadbench.errors import LoadbenchError
from loadbench.formats.base import (
    _FORMATS,
    DTYPES,
    Format,
    Option,
    SplitLayout,
    SplitReader,
    SplitWriter,
    register_format,
    to_stored,
    to_uint8,
)

# The order formats are listed and converted in: one file per image, then arrays, then records,
# then the device-resident tensor.
FORMAT_NAMES = (
    "files-jpeg", "files-png", "npy", "hdf5", "zarr", "lmdb", "webdataset", "tfrecord", "tensor",
)  # fmt: skip
_MODULES = {
    "files-jpeg": "files",
    "files-png": "files",
    "npy": "npy",
    "hdf5": "hdf5",
    "zarr": "zarr_store",
    "lmdb": "lmdb_store",
    "webdataset": "webdataset",
    "tfrecord": "tfrecord",
    "tensor": "tensor",
}

__all__ = [
    "DTYPES", "FORMAT_NAMES", "Format", "Option", "SplitLayout", "SplitReader", "SplitWriter",
    "get_format", "list_formats", "register_format", "to_stored", "to_uint8",
]  # fmt: skip


def _load_formats() -> dict[str, Format]:
    for module in sorted(set(_MODULES.values())):
        importlib.import_module(f"loadbench.formats.{module}")
    return {name: _FORMATS[name] for name in FORMAT_NAMES if name in _FORMATS}


def get_format(name: str) -> Format:
    if name not in _MODULES:
        raise LoadbenchError(f"unknown format {name!r}; formats: {', '.join(FORMAT_NAMES)}")
    importlib.import_module(f"loadbench.formats.{_MODULES[name]}")
    return _FORMATS[name]


def list_formats() -> list[Format]:
    return list(_load_formats().values())
