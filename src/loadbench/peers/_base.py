"""What every peer loader declares and decides before its library runs (no torch here)."""

from __future__ import annotations

from typing import Any

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats import codecs
from loadbench.formats.base import Format, Option, SplitLayout, SplitWriter
from loadbench.formats.files import FilesWriter
from loadbench.util import cpu_budget  # the threads a thread-based peer gets

__all__ = [
    "FilesPeer", "PeerFormat", "cpu_budget", "epoch_seed", "loader_args", "refuse_balance",
    "subset",
]  # fmt: skip


class PeerFormat(Format):
    """A format whose reader's `loader()` is another project's own pipeline."""

    peer = True
    accesses = ("sample",)  # peers run their own pipeline, one sample at a time
    dtypes = ("uint8",)


class FilesPeer(PeerFormat):
    """A peer over class folders of JPEG or PNG files (the `files-*` layout, byte for byte):
    `encoding` with its codec's options, written by `writer_class` with that codec."""

    writer_class = FilesWriter  # built in `writer()`, with the encoding as its codec
    tracks_every_file = False  # one file per image: the manifest lists labels.npy only

    @staticmethod
    def files_options(default: str) -> dict[str, Option]:
        return {
            "encoding": Option(default, "image file type", choices=("jpeg", "png")),
            **codecs.JPEG_OPTIONS,
            **codecs.PNG_OPTIONS,
        }

    def writer(self, layout: SplitLayout) -> SplitWriter:
        return self.writer_class(layout, layout.options["encoding"])

    def check(self, dtype, options):
        codecs.check_quality(self.name, options)

    def is_lossy(self, options):
        return options["encoding"] == "jpeg"


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed a streaming peer's shuffle gets for an epoch."""
    return (seed * 1_000_003 + epoch) % (1 << 31)


def loader_args(workers: int, pin_memory: bool) -> dict[str, Any]:
    """A DataLoader's worker settings, as the peers' documentation uses them."""
    return {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}


def refuse_balance(order, name: str) -> None:
    """Streaming peers draw in their library's order, so they cannot balance classes."""
    if order.balance != "none":
        raise LoadbenchError(
            f"{name} streams in its library's own order, so it cannot draw balance="
            f"{order.balance}; use balance none, or a map-style peer (torchvision-imagefolder, "
            "hf-datasets) or a loadbench format"
        )


def subset(order, count: int) -> np.ndarray | None:
    """The indices an epoch keeps, or None when it is the whole split."""
    indices = np.unique(order.indices)
    if len(indices) == count:
        return None
    return indices


def read_dict_items(reader, dataset, indices, errors: tuple, where) -> tuple:
    """`read_items` of a peer whose dataset gives {"index", "image", "label"} dicts by store
    index (litdata, MosaicML Streaming): each item checked to be the one asked for, with the
    store's shape and dtype; `errors` (the library's) and a wrong item are the damaged-store
    error at `where(index)`, the file that holds the item."""
    import numpy as np

    out = reader._empty(len(indices))
    labels = np.empty(len(indices), dtype=np.int64)
    for k, index in enumerate(indices):
        try:
            item = dataset[int(index)]
            found, image, labels[k] = item["index"], np.asarray(item["image"]), item["label"]
        except errors as e:
            raise reader._damaged(where(index), e) from None
        if image.ndim == 2:
            image = image[:, :, None]
        if found != index or image.shape != reader.image_shape or image.dtype != np.uint8:
            raise reader._damaged(
                where(index), f"it holds item {found!r:.20}, {image.shape} {image.dtype}"
            )
        out[k] = image
    return out, labels
