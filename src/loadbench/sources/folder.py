"""`folder:PATH` — a class-per-subfolder image tree, as torchvision's ImageFolder reads it.

Either PATH/<class>/**/<image> (one split, `train`) or PATH/{train,val,test}/<class>/**/<image>.
Sample order and class indices equal ImageFolder's on the same tree: classes are the sorted
subfolder names; files are taken class by class, walking each class folder in sorted order.
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.sources import register_source
from loadbench.sources.images import FileSplit, image_size, is_image_file, parse_size
from loadbench.sources.raw import RawDataset

SPLIT_NAMES = ("train", "val", "test")


# The options of sources that read image files (folder, tiny-imagenet).
IMAGE_FILE_OPTIONS = {
    "size": Option(
        None,
        "resize+centre-crop to N or HxW",
        parse=lambda v: str(v),
        shown="the first image's size",
    ),
    "channels": Option(
        3,
        "1 (grayscale) or 3 (RGB)",
        kind=int,
        choices=(1, 3),
        choices_text="1 (grayscale) or 3 (RGB)",
    ),
    "skip_corrupt": Option(
        False, "skip and count unreadable images instead of stopping", kind=bool
    ),
}


def find_classes(directory: str) -> list[str]:
    """Sorted names of the subfolders, as ImageFolder.find_classes."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise LoadbenchError(
            f"no class folders in {directory}; expected {directory}/<class>/<image files>"
        )
    return classes


def make_samples(directory: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """(paths, class indices) in ImageFolder's order (torchvision.datasets.folder.make_dataset)."""
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue
        for root, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                if is_image_file(fname):
                    paths.append(os.path.join(root, fname))
                    labels.append(index)
    return paths, labels


def _has_split_layout(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "train"))


def _first_size(paths: list[str], skip_corrupt: bool) -> tuple[int, int]:
    """The size of the first image (of the first readable one when skipping corrupt files)."""
    for path in paths if skip_corrupt else paths[:1]:
        try:
            return image_size(path)
        except LoadbenchError as e:
            if not skip_corrupt:
                raise LoadbenchError(
                    f"{e}, or pass --skip-corrupt to skip unreadable images"
                ) from None
    raise LoadbenchError(f"none of the {len(paths)} images can be read (first: {paths[0]})")


@register_source(
    "folder",
    options=IMAGE_FILE_OPTIONS,
    arg="PATH",
    summary="class-per-subfolder image tree (ImageFolder layout), optionally with train/val/test",
)
def open_folder(path: str, opts) -> RawDataset:
    if not os.path.isdir(path):
        raise LoadbenchError(f"folder source {path} is not a directory")
    if _has_split_layout(path):
        split_dirs = {
            s: os.path.join(path, s) for s in SPLIT_NAMES if os.path.isdir(os.path.join(path, s))
        }
    else:
        split_dirs = {"train": path}
    classes = find_classes(split_dirs["train"])
    samples = {}
    for split, directory in split_dirs.items():
        extra = sorted(set(find_classes(directory)) - set(classes))
        if extra:
            raise LoadbenchError(
                f"{directory} has class folder(s) {', '.join(extra)} that train does not have; "
                "every split must use the training classes"
            )
        paths, labels = make_samples(directory, classes)
        if not paths:
            raise LoadbenchError(
                f"no image files ({', '.join(('.jpg', '.png', '...'))}) under {directory}/<class>/"
            )
        samples[split] = (paths, labels)
    size = parse_size(opts.size) or _first_size(samples["train"][0], opts.skip_corrupt)
    splits = {
        s: FileSplit(paths, np.array(labels), size, opts.channels)
        for s, (paths, labels) in samples.items()
    }
    return RawDataset(classes=classes, image_shape=(*size, opts.channels), splits=splits)
