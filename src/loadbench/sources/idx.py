"""`mnist:PATH` and `fashion-mnist:PATH` — the IDX files `train-images-idx3-ubyte[.gz]` etc.

PATH is the folder holding the four files, or a torchvision root (`MNIST/raw/`,
`FashionMNIST/raw/` below it). Splits train (60,000) and test (10,000), images 28x28x1.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.sources import register_source
from loadbench.sources.base import SourceOptions
from loadbench.sources.raw import ArraySplit, RawDataset

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_CLASSES = [str(i) for i in range(10)]
# torchvision.datasets.FashionMNIST.classes
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: str, expected_dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080N, big-endian sizes) as an array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise LoadbenchError(f"cannot read {path}: {e}") from None
    if len(data) < 4:
        raise LoadbenchError(f"{path} is truncated: {len(data)} bytes, not even an IDX header")
    zero, dtype_code, dims = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise LoadbenchError(
            f"{path} is not an IDX file of unsigned bytes with {expected_dims} dimension(s) "
            f"(magic {data[:4].hex()}, expected 000008{expected_dims:02x})"
        )
    header = 4 + 4 * dims
    if len(data) < header:
        raise LoadbenchError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise LoadbenchError(
            f"{path} is {state}: {len(data)} bytes, the header {shape} needs {expected}; "
            "download the file again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: str, name: str, subdirs: tuple[str, ...]) -> str | None:
    for sub in ("", *subdirs):
        for candidate in (name, name + ".gz"):
            path = os.path.join(root, sub, candidate)
            if os.path.isfile(path):
                return path
    return None


def _read_idx_dataset(path: str, classes: list[str], subdirs: tuple[str, ...]) -> RawDataset:
    if not os.path.isdir(path):
        raise LoadbenchError(f"{path} is not a folder of IDX files")
    splits = {}
    for split, (image_name, label_name) in FILES.items():
        image_file, label_file = _find(path, image_name, subdirs), _find(path, label_name, subdirs)
        if image_file is None or label_file is None:
            if split == "test" and splits:
                continue  # a folder with only the training files is still usable
            missing = image_name if image_file is None else label_name
            raise LoadbenchError(
                f"{path} has no {missing}[.gz]; expected the IDX files "
                f"{', '.join(sum(FILES.values(), ()))} (optionally .gz)"
            )
        images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
        if len(images) != len(labels):
            raise LoadbenchError(
                f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels"
            )
        if len(labels) and labels.max() >= len(classes):
            raise LoadbenchError(f"{label_file}: labels outside 0..{len(classes) - 1}")
        if splits and images.shape[1:] != splits["train"].images.shape[1:3]:
            raise LoadbenchError(
                f"{image_file} has {images.shape[1]}x{images.shape[2]} images, the training "
                f"files {splits['train'].images.shape[1]}x{splits['train'].images.shape[2]}"
            )
        splits[split] = ArraySplit(images[..., None], labels.astype(np.int64))
    shape = splits["train"].images.shape[1:]
    return RawDataset(classes=classes, image_shape=tuple(shape), splits=splits)


@register_source("mnist", summary="MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
def open_mnist(path: str, opts: SourceOptions) -> RawDataset:
    return _read_idx_dataset(path, MNIST_CLASSES, ("raw", "MNIST/raw"))


@register_source(
    "fashion-mnist", summary="Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)"
)
def open_fashion_mnist(path: str, opts: SourceOptions) -> RawDataset:
    return _read_idx_dataset(path, FASHION_CLASSES, ("raw", "FashionMNIST/raw"))
