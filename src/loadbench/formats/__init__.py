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
# Peer loaders: other projects' own libraries over the same data, benchmarked side by side.
# Optional (`pip install loadbench[peers]`); "all" means loadbench's formats, "peers" these.
PEER_NAMES = ("torchvision-imagefolder", "webdataset-lib", "hf-datasets", "litdata")
ALL_NAMES = FORMAT_NAMES + PEER_NAMES
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
    **{name: "peers" for name in PEER_NAMES},
}

__all__ = [
    "ALL_NAMES", "DTYPES", "FORMAT_NAMES", "PEER_NAMES", "Format", "Option", "SplitLayout",
    "SplitReader", "SplitWriter", "expand_names", "get_format", "list_formats",
    "register_format", "to_stored", "to_uint8",
]  # fmt: skip


def _load_formats() -> dict[str, Format]:
    for module in sorted(set(_MODULES.values())):
        importlib.import_module(f"loadbench.formats.{module}")
    return {name: _FORMATS[name] for name in ALL_NAMES if name in _FORMATS}


def get_format(name: str) -> Format:
    if name not in _MODULES:
        raise LoadbenchError(
            f"unknown format {name!r}; formats: {', '.join(FORMAT_NAMES)}; "
            f"peer loaders: {', '.join(PEER_NAMES)}"
        )
    importlib.import_module(f"loadbench.formats.{_MODULES[name]}")
    return _FORMATS[name]


def list_formats(peers: bool = False) -> list[Format]:
    """loadbench's formats, then (with `peers`) the peer loaders."""
    return [f for f in _load_formats().values() if peers or not f.peer]


def expand_names(names: list[str]) -> list[str]:
    """Format names with "all" (loadbench's formats) and "peers" (the peer loaders) expanded,
    duplicates dropped; an unknown name raises LoadbenchError."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(FORMAT_NAMES)
        elif name == "peers":
            out.extend(PEER_NAMES)
        elif name in ALL_NAMES:
            out.append(name)
        else:
            get_format(name)  # raises the unknown-format error
    return list(dict.fromkeys(out))
