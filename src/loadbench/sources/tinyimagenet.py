"""`tiny-imagenet:PATH` — the `tiny-imagenet-200/` layout (200 classes of 64x64 JPEGs).

train/<wnid>/images/*.JPEG and val/images/*.JPEG with val/val_annotations.txt. Class index is
the wnid's position in sorted order (as ImageFolder on train/). The test split has no labels and
is not read.
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.sources import register_source
from loadbench.sources.folder import IMAGE_FILE_OPTIONS, make_samples
from loadbench.sources.images import FileSplit, parse_size
from loadbench.sources.raw import RawDataset


def _root(path: str) -> str:
    for candidate in (path, os.path.join(path, "tiny-imagenet-200")):
        if os.path.isfile(os.path.join(candidate, "wnids.txt")):
            return candidate
    raise LoadbenchError(
        f"{path} is not a Tiny ImageNet folder: no wnids.txt; expected tiny-imagenet-200/ with "
        "wnids.txt, train/<wnid>/images/*.JPEG and val/val_annotations.txt"
    )


def _descriptions(root: str, wnids: list[str]) -> dict[str, str]:
    words = os.path.join(root, "words.txt")
    if not os.path.isfile(words):
        return {}
    wanted = set(wnids)
    found = {}
    with open(words, encoding="utf-8") as f:
        for line in f:
            wnid, _, text = line.rstrip("\n").partition("\t")
            if wnid in wanted:
                found[wnid] = text
    return found


def _val_samples(root: str, index: dict[str, int]) -> tuple[list[str], list[int]]:
    notes = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(notes):
        raise LoadbenchError(f"Tiny ImageNet at {root} has no val/val_annotations.txt")
    paths, labels = [], []
    with open(notes, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0].strip():
                if line.strip():
                    raise LoadbenchError(f"{notes}:{number}: expected 'file<TAB>wnid<TAB>...'")
                continue
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise LoadbenchError(f"{notes}:{number}: wnid {wnid} is not in wnids.txt")
            paths.append(os.path.join(root, "val", "images", name))
            labels.append(index[wnid])
    return paths, labels


@register_source(
    "tiny-imagenet",
    options=IMAGE_FILE_OPTIONS,
    summary="Tiny ImageNet (tiny-imagenet-200/: wnids.txt, train/, val/): splits train, val",
)
def open_tiny_imagenet(path: str, opts) -> RawDataset:
    root = _root(path)
    with open(os.path.join(root, "wnids.txt"), encoding="utf-8") as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not os.path.isdir(os.path.join(root, "train")):
        raise LoadbenchError(f"Tiny ImageNet at {root} has no train/ folder")
    index = {w: i for i, w in enumerate(wnids)}
    samples = {"train": make_samples(os.path.join(root, "train"), wnids)}
    if not samples["train"][0]:
        raise LoadbenchError(f"no images under {root}/train/<wnid>/images/")
    if os.path.isdir(os.path.join(root, "val")):
        samples["val"] = _val_samples(root, index)
    size = parse_size(opts.size) or (64, 64)
    splits = {
        s: FileSplit(paths, np.array(labels), size, opts.channels)
        for s, (paths, labels) in samples.items()
    }
    return RawDataset(
        classes=wnids,
        image_shape=(*size, opts.channels),
        splits=splits,
        details={"class_descriptions": _descriptions(root, wnids)},
    )
