"""`dali-files`, `dali-npy`, `dali-tfrecord`, `dali-webdataset`: NVIDIA DALI pipelines over the
bytes of loadbench's `files-*`, `npy`, `tfrecord` and `webdataset` stores, handed to torch by
DALI's PyTorch plugin (`DALIGenericIterator`, `LastBatchPolicy.PARTIAL`, `reader_name`), as
DALI's documentation shows:

- readers: https://docs.nvidia.com/deeplearning/dali/user-guide/docs/operations/nvidia.dali.fn.readers.file.html
  (and `readers.tfrecord`, `readers.webdataset` on the same site);
- TFRecord and its index: https://docs.nvidia.com/deeplearning/dali/user-guide/docs/examples/general/data_loading/dataloading_tfrecord.html
- WebDataset and `wds2idx`: https://docs.nvidia.com/deeplearning/dali/user-guide/docs/examples/general/data_loading/dataloading_webdataset.html
- external source with PyTorch: https://docs.nvidia.com/deeplearning/dali/user-guide/docs/examples/frameworks/pytorch/pytorch-external_input.html
  (its parallel mode, https://docs.nvidia.com/deeplearning/dali/user-guide/docs/examples/general/data_loading/parallel_external_source.html,
  was measured slower here: see `NpyGraph`);
- PyTorch iterator: https://docs.nvidia.com/deeplearning/dali/user-guide/docs/plugins/pytorch_plugin_api.html

One peer per stored layout, because an experiment keys options by format name. The readers
shuffle in DALI's own way (`random_shuffle` through a buffer of `initial_fill` samples, seeded
from (seed, epoch)), so the three reader peers stream in their own order. `npy` keeps one
array per split, and `fn.readers.numpy` reads one sample per file (the whole array would be one
sample), so `dali-npy` feeds the memory map through `fn.external_source` instead, in batch mode
(so that the last batch can be partial): the source is the user's own code, so it follows
loadbench's epoch order, and every `balance` works. Random access (`read_items`, `verify`) goes
through loadbench's reader of the same layout: DALI has none.
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.formats.base import Option, SplitLayout, register_format
from loadbench.formats.files import FilesReader
from loadbench.formats.npy import NpyReader, NpyWriter
from loadbench.formats.records import SHARD_OPTION, RecordFormat, encoding_options
from loadbench.formats.tfrecord import TfRecordReader, TfRecordWriter
from loadbench.formats.webdataset import EXTENSION, WebDatasetReader, WebDatasetWriter
from loadbench.peers._base import FilesPeer, PeerFormat, cpu_budget, refuse_balance, subset

INITIAL_FILL = {
    "initial_fill": Option(1024, "samples in DALI's reader shuffle buffer (its default)",
                           kind=int, minimum=1),
}  # fmt: skip


class _DaliPeer(PeerFormat):
    """What the DALI peers share: the library they need, and how to install it."""

    requires = ("nvidia.dali",)
    install = "nvidia-dali-cuda130"


def _reader_loader(graph, order, batch_size, workers, pin_memory, augmenter, labels,
                   keep):  # fmt: skip
    """The loader of a reader peer: DALI's own order, on `cpu_budget(workers)` threads."""
    from loadbench.peers._dali_pipelines import DaliEpochs

    return DaliEpochs(
        graph, order, batch_size, labels=labels, augmenter=augmenter,
        threads=cpu_budget(workers), keep=keep, pin_memory=pin_memory,
    )  # fmt: skip


# -- dali-files ---------------------------------------------------------------------------------


class DaliFilesReader(FilesReader):
    """`fn.readers.file` with `files=` (the epoch's own files only, so a carved subset reads
    nothing else) and each file's store index as its DALI label."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._dali_pipelines import FilesGraph

        refuse_balance(order, "dali-files")
        labels = self.labels()
        keep = subset(order, self.count)
        indices = np.arange(self.count) if keep is None else keep
        files = [self.path(int(i), int(labels[i])) for i in indices]
        graph = FilesGraph(files, indices.tolist(), self.image_shape[2],
                           self.options["initial_fill"])  # fmt: skip
        return _reader_loader(graph, order, batch_size, workers, pin_memory, augmenter,
                              labels, keep=None)  # fmt: skip


@register_format
class DaliFilesPeer(_DaliPeer, FilesPeer):
    name = "dali-files"
    own_order = True
    summary = "peer: NVIDIA DALI readers.file + decoders.image over class folders of JPEG/PNG"
    # JPEG by default: what DALI's image pipelines read (nvJPEG when there is a GPU).
    options = {**FilesPeer.files_options("jpeg"), **INITIAL_FILL}
    reader_class = DaliFilesReader


# -- dali-npy -----------------------------------------------------------------------------------


class DaliNpyReader(NpyReader):
    """The `npy` format's images array through `fn.external_source`, in loadbench's order."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._dali_pipelines import DaliEpochs, NpyGraph

        labels = self.labels()  # opens (and checks) the split's arrays first
        path = os.path.join(self.root, f"{self.split}_images.npy")
        return DaliEpochs(
            NpyGraph(path, batch_size), order, batch_size, labels=labels, augmenter=augmenter,
            threads=cpu_budget(workers), mapped=True, pin_memory=pin_memory,
        )  # fmt: skip


@register_format
class DaliNpyPeer(_DaliPeer):
    name = "dali-npy"
    summary = "peer: NVIDIA DALI external_source over the npy format's memory map"
    writer_class = NpyWriter  # the npy format's files, byte for byte
    reader_class = DaliNpyReader


# -- dali-tfrecord ------------------------------------------------------------------------------


class DaliTfRecordReader(TfRecordReader):
    """`fn.readers.tfrecord` over the shards and the `.index` file beside each, which the
    `tfrecord` format writes in the layout of DALI's `tfrecord2idx` ("offset size" a line)."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._dali_pipelines import TfRecordGraph

        refuse_balance(order, "dali-tfrecord")
        index = self.handle["index"]
        paths = [os.path.join(self.root, name) for name in self.shard_names]
        where = zip(index["shard"].tolist(), index["offset"].tolist(), strict=True)
        offsets = {(paths[shard], offset): i for i, (shard, offset) in enumerate(where)}
        graph = TfRecordGraph(
            paths, [path + ".index" for path in paths], self.options["encoding"],
            self.image_shape, self.options["initial_fill"], offsets,
        )  # fmt: skip
        labels, keep = index["label"].astype(np.int64), subset(order, self.count)
        return _reader_loader(graph, order, batch_size, workers, pin_memory, augmenter,
                              labels, keep)  # fmt: skip


@register_format
class DaliTfRecordPeer(_DaliPeer, RecordFormat):
    name = "dali-tfrecord"
    own_order = True
    summary = "peer: NVIDIA DALI readers.tfrecord over the tfrecord format's shards and index"
    raw_encoding = "raw"
    options = {**SHARD_OPTION, **encoding_options("raw"), **INITIAL_FILL}
    writer_class = TfRecordWriter
    reader_class = DaliTfRecordReader


# -- dali-webdataset ----------------------------------------------------------------------------


def dali_index_path(shard_path: str) -> str:
    """Where `wds2idx` puts a shard's index by default: `<name>.idx` beside `<name>.tar`."""
    return shard_path.removesuffix(".tar") + ".idx"


class DaliWebDatasetWriter(WebDatasetWriter):
    """The `webdataset` format's shards, plus DALI's index of each, made by DALI's own
    `wds2idx` tool once the split is written (without it DALI scans every tar when a
    pipeline is built)."""

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        from wds2idx import IndexCreator  # DALI's wds2idx, installed with nvidia-dali

        extras = super().join(layout, parts)
        for name in extras["shards"]:
            shard = os.path.join(layout.root, name)
            with IndexCreator(shard, dali_index_path(shard), verbose=False) as creator:
                creator.create_index()
        return extras


class DaliWebDatasetReader(WebDatasetReader):
    """`fn.readers.webdataset` over the tar shards with their DALI indexes; `.npy` members
    decoded by `fn.decoders.numpy`, PNG/JPEG by `fn.decoders.image`."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._dali_pipelines import WebDatasetGraph

        refuse_balance(order, "dali-webdataset")
        index = self.handle["index"]
        paths = [os.path.join(self.root, name) for name in self.shard_names]
        indexes = [dali_index_path(path) for path in paths]  # listed in the manifest
        graph = WebDatasetGraph(paths, indexes, EXTENSION[self.options["encoding"]],
                                self.image_shape, self.options["initial_fill"])  # fmt: skip
        labels, keep = index["label"].astype(np.int64), subset(order, self.count)
        return _reader_loader(graph, order, batch_size, workers, pin_memory, augmenter,
                              labels, keep)  # fmt: skip


@register_format
class DaliWebDatasetPeer(_DaliPeer, RecordFormat):
    name = "dali-webdataset"
    own_order = True
    summary = "peer: NVIDIA DALI readers.webdataset over the webdataset format's tar shards"
    raw_encoding = "npy"
    # npy by default, as the `webdataset` format: the same shards (DALI decodes them with
    # `fn.decoders.numpy`), so the two differ only in the pipeline that reads them.
    options = {**SHARD_OPTION, **encoding_options("npy"), **INITIAL_FILL}
    writer_class = DaliWebDatasetWriter
    reader_class = DaliWebDatasetReader
