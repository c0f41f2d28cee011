"""Storage formats and peer loaders, by name: `get_format("hdf5")` returns one.

A format is a `Format` subclass registered with `@register_format` in a module of its own.
The modules below are imported on first use, in this order, which is the order formats are
listed, converted and reported in. Heavy libraries (h5py, zarr, lmdb, webdataset, torch) are
imported inside each format's writer and reader, so listing formats, or building the command
line, imports none of them.
"""

from __future__ import annotations

import importlib

from loadbench.errors import LoadbenchError
from loadbench.formats.base import (
    REGISTRY,
    Format,
    Option,
    SplitLayout,
    SplitReader,
    SplitWriter,
    register_format,
)
from loadbench.formats.pixels import DTYPES, to_stored, to_uint8

# Adding a format: its module, and one line here. One file per image, then arrays, then
# records, then the device-resident tensor.
MODULES = (
    "loadbench.formats.files",
    "loadbench.formats.npy",
    "loadbench.formats.hdf5",
    "loadbench.formats.zarr_store",
    "loadbench.formats.lmdb_store",
    "loadbench.formats.webdataset",
    "loadbench.formats.tfrecord",
    "loadbench.formats.arrayrecord",
    "loadbench.formats.tensor",
)
# Peer loaders (other projects' libraries, optional installs) are found, not listed: every
# module of this package but its shared parts (`_base`, `_pipeline`). Adding a peer is its
# module and its pip name in the `peers` extra.
PEERS_PACKAGE = "loadbench.peers"

__all__ = [
    "DTYPES", "MODULES", "PEERS_PACKAGE", "Format", "Option", "SplitLayout", "SplitReader",
    "SplitWriter", "all_names", "expand_names", "format_names", "get_format", "is_format",
    "list_formats", "peer_modules", "peer_names", "register_format", "to_stored", "to_uint8",
    "unregister_format",
]  # fmt: skip

_loaded = False


def peer_modules() -> list[str]:
    """The peer loaders' modules, by name."""
    import pkgutil

    package = importlib.import_module(PEERS_PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    return [f"{PEERS_PACKAGE}.{name}" for name in names if not name.startswith("_")]


def _registry() -> dict[str, Format]:
    """Every format: loadbench's in `MODULES` order, then the peers, then formats registered
    from elsewhere."""
    global _loaded
    if not _loaded:
        modules = [*MODULES, *peer_modules()]
        for module in modules:
            importlib.import_module(module)
        _loaded = True
        rank = {module: k for k, module in enumerate(modules)}
        ordered = sorted(REGISTRY.values(), key=lambda f: rank.get(type(f).__module__, len(rank)))
        REGISTRY.clear()  # the same dict, in order: base.py lists from it too
        REGISTRY.update((f.name, f) for f in ordered)
    return REGISTRY


def format_names() -> list[str]:
    """loadbench's own formats (what `--format all` means)."""
    return [f.name for f in _registry().values() if not f.peer]


def peer_names() -> list[str]:
    """The peer loaders (what `--format peers` means)."""
    return [f.name for f in _registry().values() if f.peer]


def all_names() -> list[str]:
    return list(_registry())


def __getattr__(name: str):
    # The name lists as they were constants: computed from the registry when asked.
    lists = {"FORMAT_NAMES": format_names, "PEER_NAMES": peer_names, "ALL_NAMES": all_names}
    if name in lists:
        return tuple(lists[name]())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_format(name: str) -> bool:
    return name in _registry()


def get_format(name: str) -> Format:
    registry = _registry()
    if name not in registry:
        raise LoadbenchError(
            f"unknown format {name!r}; formats: {', '.join(format_names())}; "
            f"peer loaders: {', '.join(peer_names())}"
        )
    return registry[name]


def unregister_format(name: str) -> None:
    """Forget a format registered outside `MODULES` (a plug-in, or a test's)."""
    REGISTRY.pop(name, None)


def list_formats(peers: bool = False) -> list[Format]:
    """loadbench's formats, then (with `peers`) the peer loaders."""
    return [f for f in _registry().values() if peers or not f.peer]


def expand_names(names: list[str]) -> list[str]:
    """Format names with "all" (loadbench's formats) and "peers" (the peer loaders) expanded,
    duplicates dropped; an unknown name raises LoadbenchError."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(format_names())
        elif name == "peers":
            out.extend(peer_names())
        else:
            out.append(get_format(name).name)  # raises the unknown-format error
    return list(dict.fromkeys(out))
