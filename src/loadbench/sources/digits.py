"""`digits` — scikit-learn's bundled handwritten digits: 1,797 real 8x8 scans, no download.

The embedded default. The scans have 17 grey levels (0..16); they are stored as uint8 0..255
(v * 255 / 16, rounded). scikit-learn ships no split, so a fixed stratified 20% test split
(seed 0) is cut here; every load gives the same split.
"""

from __future__ import annotations

import numpy as np

from loadbench.sources import register_source
from loadbench.sources.base import SourceOptions
from loadbench.sources.raw import ArraySplit, RawDataset
from loadbench.sources.selection import stratified_sample


@register_source(
    "digits",
    arg="",
    arg_required=False,
    arg_is_path=False,
    summary="scikit-learn's handwritten digits (1,797 real 8x8 scans, embedded): train, test",
)
def open_digits(arg: str | None, opts: SourceOptions) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    test = stratified_sample(labels, 0.2, seed=0)
    train = np.setdiff1d(np.arange(len(labels)), test)
    splits = {
        "train": ArraySplit(images[train], labels[train]),
        "test": ArraySplit(images[test], labels[test]),
    }
    return RawDataset(classes=[str(i) for i in range(10)], image_shape=(8, 8, 1), splits=splits)
