"""`cifar10:PATH` and `cifar100:PATH` — the CIFAR "python version" (pickled batches).

PATH is the extracted folder (`cifar-10-batches-py/`, `cifar-100-python/`), its parent (a
torchvision root), or the `.tar.gz` archive, read in place without extracting. The pickles are
loaded with a restricted unpickler: only the containers, strings, numbers and NumPy arrays that
the real files hold can be built, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.sources import register_source
from loadbench.sources.base import SourceOptions
from loadbench.sources.raw import ArraySplit, RawDataset


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    archive: str
    meta: str
    splits: dict[str, tuple[str, ...]]
    label_key: str
    names_key: str


CIFAR10 = _Layout(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    meta="batches.meta",
    splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key="labels",
    names_key="label_names",
)
CIFAR100 = _Layout(
    name="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    meta="meta",
    splits={"train": ("train",), "test": ("test",)},
    label_key="fine_labels",
    names_key="fine_label_names",
)

# Everything the published pickles contain (Python 2 protocol-2 pickles of dicts, lists, bytes,
# ints and NumPy arrays). NumPy 2 renamed numpy.core to numpy._core; both spellings are accepted.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy"):
            import numpy

            core = getattr(numpy, "_core", None) or numpy.core
            if name in ("_reconstruct", "scalar"):
                return getattr(core.multiarray, name)
            return getattr(numpy, name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module in ("copy_reg", "copyreg"):
            import copyreg

            return copyreg._reconstructor
        return object


def safe_unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise LoadbenchError(f"{where} is not a CIFAR batch: {e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError) as e:
        raise LoadbenchError(f"{where} is truncated or not a CIFAR pickle ({e})") from None
    if not isinstance(obj, dict):
        raise LoadbenchError(f"{where} is not a CIFAR batch (a pickled dict expected)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _Files:
    """Read named members from the folder, or from inside the archive in one sequential pass."""

    def __init__(self, path: str, layout: _Layout):
        self.layout = layout
        self.folder: str | None = None
        self.archived: dict[str, bytes] = {}
        if os.path.isdir(path):
            for candidate in (path, os.path.join(path, layout.folder)):
                if os.path.isfile(os.path.join(candidate, layout.meta)):
                    self.folder = self.where = candidate
                    return
            path = os.path.join(path, layout.archive)
            if not os.path.isfile(path):
                raise LoadbenchError(
                    f"{os.path.dirname(path)} is not a {layout.name} folder: no {layout.meta}; "
                    f"expected the python version layout ({layout.folder}/ with {layout.meta}, "
                    f"{', '.join(sum(layout.splits.values(), ()))}) or {layout.archive}"
                )
        self.where = path
        wanted = {layout.meta, *sum(layout.splits.values(), ())}
        try:
            # Gzip streams cannot seek back cheaply: take every wanted member in one pass.
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    name = os.path.basename(member.name)
                    if member.isfile() and name in wanted:
                        self.archived[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise LoadbenchError(f"{path} is not a readable {layout.archive}: {e}") from None

    def read(self, name: str) -> dict:
        if self.folder is None:
            if name not in self.archived:
                raise LoadbenchError(f"{self.where} has no {name} inside the archive")
            return safe_unpickle(self.archived[name], f"{self.where}:{name}")
        file = os.path.join(self.folder, name)
        if not os.path.isfile(file):
            raise LoadbenchError(f"{self.layout.name} folder {self.folder} has no {name}")
        with open(file, "rb") as f:
            return safe_unpickle(f.read(), file)


def _decode_names(names) -> list[str]:
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar(path: str, layout: _Layout, label_key: str, names_key: str) -> RawDataset:
    files = _Files(path, layout)
    meta = files.read(layout.meta)
    if names_key not in meta:
        raise LoadbenchError(f"{files.where}: {layout.meta} has no {names_key}")
    classes = _decode_names(meta[names_key])
    splits = {}
    for split, batch_names in layout.splits.items():
        images, labels = [], []
        for name in batch_names:
            batch = files.read(name)
            where = f"{files.where}:{name}"
            if "data" not in batch or label_key not in batch:
                raise LoadbenchError(f"{where} has no 'data' or '{label_key}' entry")
            data = np.asarray(batch["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise LoadbenchError(
                    f"{where}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
                )
            batch_labels = np.asarray(batch[label_key], dtype=np.int64)
            if len(batch_labels) != len(data):
                raise LoadbenchError(f"{where}: {len(data)} images but {len(batch_labels)} labels")
            if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= len(classes)):
                raise LoadbenchError(f"{where}: labels outside 0..{len(classes) - 1}")
            # Rows are 1024 red, 1024 green, 1024 blue values: CHW, stored as HWC here.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(batch_labels)
        splits[split] = ArraySplit(
            np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
        )
    return RawDataset(classes=classes, image_shape=(32, 32, 3), splits=splits)


@register_source(
    "cifar10",
    summary="CIFAR-10 python version (cifar-10-batches-py/ or the .tar.gz): splits train, test",
)
def open_cifar10(path: str, opts: SourceOptions) -> RawDataset:
    return _read_cifar(path, CIFAR10, CIFAR10.label_key, CIFAR10.names_key)


CIFAR100_OPTIONS = {
    "labels": Option(
        "fine",
        "fine (100 classes) or coarse (20 superclasses)",
        choices=("fine", "coarse"),
        choices_text="fine or coarse",
    ),
}


@register_source(
    "cifar100",
    options=CIFAR100_OPTIONS,
    summary="CIFAR-100 python version (cifar-100-python/ or the .tar.gz): splits train, test",
)
def open_cifar100(path: str, opts) -> RawDataset:
    return _read_cifar(path, CIFAR100, f"{opts.labels}_labels", f"{opts.labels}_label_names")
