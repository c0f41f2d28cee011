"""`webdataset-lib`: the `webdataset` format's tar shards read by the webdataset library's own
pipeline (`wds.WebDataset` -> shuffle -> decode -> to_tuple -> batched, `wds.WebLoader`), as its
documentation recommends: https://github.com/webdataset/webdataset (README, "WebLoader").
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.formats.base import Option, register_format
from loadbench.formats.records import SHARD_OPTION, RecordFormat, encoding_options
from loadbench.formats.webdataset import EXTENSION, WebDatasetReader, WebDatasetWriter
from loadbench.peers._base import PeerFormat, epoch_seed, loader_args, refuse_balance, subset


class _KeyIn:
    """`select` predicate: the sample's key (its store index) is one of `keep`."""

    def __init__(self, keep: np.ndarray):
        self.keep = frozenset(keep.tolist())

    def __call__(self, sample) -> bool:
        return int(sample["__key__"]) in self.keep


class _Pipeline:
    """The webdataset pipeline of one epoch in one worker, with seeds from (seed, epoch): shard
    shuffle after the split by worker, then a buffer shuffle."""

    def __init__(self, urls, ext, channels, keep, shuffle, seed, buffer, batch_size, sample):
        self.urls, self.ext, self.channels = urls, ext, channels
        self.keep, self.shuffle, self.seed, self.buffer = keep, shuffle, seed, buffer
        self.batch_size, self.sample = batch_size, sample

    def __call__(self, epoch: int, worker: int):
        import webdataset as wds

        from loadbench.peers._pipeline import collate

        seed = epoch_seed(self.seed, epoch)
        # empty_check off: with more workers than shards some workers get no shard, by design.
        dataset = wds.WebDataset(
            self.urls,
            shardshuffle=len(self.urls) if self.shuffle else False,
            seed=seed,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        if self.keep is not None:
            dataset = dataset.select(_KeyIn(self.keep))
        if self.shuffle:
            dataset = dataset.shuffle(self.buffer, seed=seed * 131 + worker)
        return (
            dataset.decode("l8" if self.channels == 1 else "rgb8")
            .to_tuple(self.ext, "cls", "__key__")
            .map(self._sample)
            .batched(self.batch_size, collation_fn=collate, partial=True)
        )

    def _sample(self, sample):
        return self.sample(*sample)


class WebDatasetLibReader(WebDatasetReader):
    """Random access (`read_items`, `labels`) through loadbench's member index of the same
    shards (the library has none); `loader` is the library's own streaming pipeline."""

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        import webdataset as wds

        from loadbench.peers._pipeline import EpochStream, Sample, StreamEpochs, collate

        refuse_balance(order, "webdataset-lib")
        pipeline = _Pipeline(
            urls=[os.path.join(self.root, name) for name in self.shard_names],
            ext=EXTENSION[self.options["encoding"]], channels=self.image_shape[2],
            keep=subset(order, self.count), shuffle=order.shuffle, seed=order.seed,
            buffer=self.options["shuffle_buffer"], batch_size=batch_size, sample=None,
        )  # fmt: skip
        stream = EpochStream(pipeline)
        pipeline.sample = Sample(augmenter, stream.epoch)
        loader = wds.WebLoader(stream, batch_size=None, **loader_args(workers, pin_memory))
        dataloader = loader.pipeline[0]  # WebLoader is a pipeline that starts with torch's
        if workers > 1:
            # Each worker ends its stream with a partial batch: rebatch across workers, as the
            # webdataset docs do (`loader.unbatched().batched(...)`).
            loader = loader.unbatched().batched(batch_size, collation_fn=collate, partial=True)
        return StreamEpochs(loader, order, batch_size, stream.epoch, dataloader=dataloader,
                            rebatch=False, pin_memory=pin_memory)  # fmt: skip


@register_format
class WebDatasetLibPeer(PeerFormat, RecordFormat):
    name = "webdataset-lib"
    own_order = True
    summary = "peer: the webdataset library's pipeline + WebLoader over the webdataset shards"
    requires = ("webdataset",)
    install = "webdataset"
    raw_encoding = "npy"
    # npy by default, as the `webdataset` format: byte-identical shards, so the two differ only
    # in the pipeline that reads them.
    options = {
        **SHARD_OPTION,
        **encoding_options("npy"),
        "shuffle_buffer": Option(1000, "samples in webdataset's shuffle buffer", kind=int,
                                 minimum=1),
    }  # fmt: skip
    writer_class = WebDatasetWriter
    reader_class = WebDatasetLibReader
