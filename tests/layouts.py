"""Writers of tiny datasets in the real published layouts, for the source tests.

Every writer puts the files exactly where and how the published archives have them (file names,
pickle protocol and keys, IDX headers, Tiny ImageNet's annotation files), only with a few
images, so the readers can be checked against torchvision's on the same tree without a download.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------
# CIFAR "python version"

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class _Py2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (BINSTRING opcodes), as the published batches hold them.

    Python 3 would write bytes as `_codecs.encode(...)` calls; Python 2's cPickle, which made the
    CIFAR files, wrote its byte strings as (SHORT_)BINSTRING. That is why
    `pickle.load(f, encoding="latin1")` (torchvision) gets str keys and `encoding="bytes"` (the
    CIFAR page's snippet) gets b'data'.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def cifar_pickle(obj: dict, style: str = "py2") -> bytes:
    """A protocol-2 pickle of obj.

    style "py2": as the published files are (Python 2 cPickle, NumPy 1): byte strings as
    BINSTRING and arrays rebuilt by `numpy.core.multiarray._reconstruct`. style "py3": what
    `pickle.dumps(obj, protocol=2)` gives today (`_codecs.encode`, `numpy._core`).
    """
    if style == "py3":
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random images as the batches hold them: uint8 (n, 3072), 1024 R, 1024 G, 1024 B."""
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0, style: str = "py2") -> Path:
    """root/cifar-10-batches-py/{batches.meta,data_batch_1..5,test_batch,readme.html}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(cifar_pickle(meta, style))
    names = [(name, f"training batch {i} of 5") for i, name in enumerate(CIFAR10_TRAIN_BATCHES, 1)]
    names.append(("test_batch", "testing batch 1 of 1"))
    for name, batch_label in names:
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {
            b"batch_label": batch_label.encode(),
            b"labels": labels,
            b"data": cifar_images(rng, per_batch),
            b"filenames": [f"img_{name}_{k}.png".encode() for k in range(per_batch)],
        }
        (folder / name).write_bytes(cifar_pickle(batch, style))
    (folder / "readme.html").write_text("<html>see the CIFAR page</html>")
    return folder


def write_cifar100(root: Path, n_train: int = 8, n_test: int = 4, seed: int = 1) -> Path:
    """root/cifar-100-python/{meta,train,test} with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine_{i:02d}".encode() for i in range(100)]
    coarse = [f"coarse_{i:02d}".encode() for i in range(20)]
    meta = {b"fine_label_names": fine, b"coarse_label_names": coarse}
    (folder / "meta").write_bytes(cifar_pickle(meta))
    for name, n in (("train", n_train), ("test", n_test)):
        fine_labels = [int(v) for v in rng.integers(0, 100, n)]
        batch = {
            b"filenames": [f"{name}_{k}.png".encode() for k in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": fine_labels,
            b"coarse_labels": [v // 5 for v in fine_labels],
            b"data": cifar_images(rng, n),
        }
        (folder / name).write_bytes(cifar_pickle(batch))
    return folder


def tar_gz(folder: Path, archive: Path) -> Path:
    """archive.tar.gz holding folder under its own name (`cifar-10-batches-py/...`)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


class Evil:
    """Unpickling this runs a shell command, as a crafted 'CIFAR batch' could."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX of unsigned bytes: magic 0x000008NN (NN = dimensions), big-endian sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx_dataset(
    folder: Path,
    n_train: int = 20,
    n_test: int = 10,
    seed: int = 0,
    gz: bool = False,
    labels: dict[str, np.ndarray] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four IDX files in folder (gzipped when gz); returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        if labels is not None:
            split_labels = np.asarray(labels[split], dtype=np.uint8)
        else:
            split_labels = (np.arange(n) % 10).astype(np.uint8)
            rng.shuffle(split_labels)
        image_name, label_name = IDX_FILES[split]
        for name, array in ((image_name, images), (label_name, split_labels)):
            data = idx_bytes(array)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written[split] = (images, split_labels.astype(np.int64))
    return written


# ---------------------------------------------------------------------------------------------
# Image files (Tiny ImageNet, image folders)


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_image(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array, mode=mode).save(path, format=fmt)
    return path


def pil_rgb(path: Path | str) -> np.ndarray:
    """How any reader decodes the file: PIL, converted to RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


TINY_WNIDS = ["n03000003", "n01000001", "n02000002"]  # wnids.txt order: not sorted
TINY_WORDS = {
    "n01000001": "goldfish, Carassius auratus",
    "n02000002": "European fire salamander",
    "n03000003": "bullfrog, Rana catesbeiana",
    "n09999999": "a class of the full ImageNet that Tiny ImageNet lacks",
}


def write_tiny_imagenet(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """root/tiny-imagenet-200/ with wnids.txt, words.txt, train/, val/, test/ (JPEGs, 64x64).

    The second training image of n02000002 is a grayscale JPEG, as a few real ones are.
    Returns the tiny-imagenet-200 folder.
    """
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in TINY_WNIDS))
    (base / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in TINY_WORDS.items()))
    for wnid in TINY_WNIDS:
        boxes = []
        for k in range(per_class):
            name = f"{wnid}_{k}.JPEG"
            if wnid == "n02000002" and k == 1:
                array = rng.integers(0, 256, (64, 64), dtype=np.uint8)
            else:
                array = random_rgb(rng, 64, 64)
            save_image(base / "train" / wnid / "images" / name, array, "JPEG")
            boxes.append(f"{name}\t{k}\t{k + 1}\t{60 - k}\t{61 - k}\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val_wnids = ["n02000002", "n03000003", "n01000001", "n02000002"]
    lines = []
    for k, wnid in enumerate(val_wnids):
        save_image(base / "val" / "images" / f"val_{k}.JPEG", random_rgb(rng, 64, 64), "JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t{k}\t{k + 2}\t{50 + k}\t{60 - k}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    save_image(base / "test" / "images" / "test_0.JPEG", random_rgb(rng, 64, 64), "JPEG")
    return base


def corrupt_bytes(seed: int = 0, n: int = 300) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
