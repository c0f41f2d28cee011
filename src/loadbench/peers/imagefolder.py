"""`torchvision-imagefolder`: class folders of PNG/JPEG files (the `files-*` layout) read by
`torchvision.datasets.ImageFolder(..., transform=ToTensor())` + a DataLoader, as torchvision's
own documentation and tutorials do:
https://pytorch.org/vision/stable/generated/torchvision.datasets.ImageFolder.html
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.formats import codecs
from loadbench.formats.base import register_format
from loadbench.formats.files import FilesReader
from loadbench.peers._base import FilesPeer


def _gray_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("L")


class ImageFolderReader(FilesReader):
    """`ImageFolder` over the split's class folders (the `files-*` layout, whose fields it
    takes from `FilesReader`); files are named by store index."""

    def _open(self):
        from torchvision import datasets, transforms

        extra = {"loader": _gray_loader} if self.image_shape[2] == 1 else {}
        try:
            # allow_empty: a small split may lack a class; its folder is there, empty.
            folder = datasets.ImageFolder(
                self.dir, transform=transforms.ToTensor(), allow_empty=True, **extra
            )
        except (OSError, ValueError) as e:
            raise self._damaged(f"ImageFolder cannot open {self.dir}", e) from None
        if folder.classes != self.class_dirs:
            raise self._damaged(self.split, f"class folders {folder.classes}")
        # ImageFolder sorts by class folder, then file name; the file name is the store index.
        positions = np.full(self.count, -1, dtype=np.int64)
        for position, (path, _) in enumerate(folder.samples):
            index = int(os.path.splitext(os.path.basename(path))[0])
            if 0 <= index < self.count:
                positions[index] = position
        if len(folder.samples) != self.count or (positions < 0).any():
            raise self._damaged(self.split, f"{len(folder.samples)} image files")
        labels = np.asarray(folder.targets, dtype=np.int64)[positions]
        return {"folder": folder, "positions": positions, "labels": labels}

    @property
    def handle(self):
        # ImageFolder holds lists, not open files: forked workers use the parent's, as in a
        # user's script, instead of each scanning the folders again.
        if self._handle is None:
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def labels(self) -> np.ndarray:
        return self.handle["labels"].copy()

    def read_items(self, indices):
        h = self.handle
        folder, out = h["folder"], self._empty(len(indices))
        for k, index in enumerate(indices):
            path = folder.samples[h["positions"][index]][0]
            try:
                image = np.asarray(folder.loader(path), dtype=np.uint8)
            except codecs.pil_errors() as e:  # a decompression bomb is refused, from its header
                raise self._damaged(
                    f"cannot read {self._rel(path)}", codecs.pil_message(e)
                ) from None
            if image.ndim == 2:
                image = image[:, :, None]
            if image.shape != self.image_shape:
                raise self._damaged(f"cannot read {self._rel(path)}", f"an image of {image.shape}")
            out[k] = image
        return out, h["labels"][indices]

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def samples(self, indices):
        h = self.handle
        folder, out = h["folder"], []
        for i in indices:
            position = int(h["positions"][i])
            try:
                out.append(folder[position])
            except codecs.pil_errors() as e:
                path = folder.samples[position][0]
                raise self._damaged(
                    f"cannot read {self._rel(path)}", codecs.pil_message(e)
                ) from None
        return out

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._pipeline import map_style_loader

        _ = self.handle  # scan the folders once, here, before the workers start
        return map_style_loader(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class ImageFolderPeer(FilesPeer):
    name = "torchvision-imagefolder"
    summary = "peer: torchvision ImageFolder + DataLoader over class folders of PNG/JPEG files"
    requires = ("torchvision",)
    install = "torchvision"
    # PNG by default: lossless, so the peer trains on the very pixels the other stores hold.
    options = FilesPeer.files_options("png")
    reader_class = ImageFolderReader
