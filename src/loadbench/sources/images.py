"""Image files as a split: decode, convert to the wanted channels, resize and centre-crop once."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.formats import codecs
from loadbench.sources.raw import OriginalSizes, RawSplit

# The extensions torchvision's ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """`512` or `512x384` (height x width) -> (height, width)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return (text, text)
    h, sep, w = str(text).lower().partition("x")
    try:
        size = (int(h), int(w)) if sep else (int(h), int(h))
    except ValueError:
        raise LoadbenchError(f"size {text!r} is not N or HxW (e.g. 512 or 28x32)") from None
    if min(size) <= 0:
        raise LoadbenchError(f"size {text!r} must be positive")
    return size


def read_image(path: str, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode one file into uint8 (H, W, C), resized (shorter side) and centre-cropped to size.

    Images already of the target size pass through untouched, so an image tree written by
    loadbench reads back bit for bit.
    """
    try:
        # Pillow tries every format it knows, as ImageFolder's loader does; an image over
        # Pillow's pixel limit (a decompression bomb) is refused from its header, unread.
        with codecs.open_image(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if (im.height, im.width) != size:
                im = _resize_center_crop(im, size)
            arr = np.asarray(im, dtype=np.uint8)
    except codecs.pil_errors() as e:
        raise LoadbenchError(
            f"cannot decode image {path}: {codecs.pil_message(e)}; replace or remove the file, "
            "or pass --skip-corrupt to skip unreadable images"
        ) from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize_center_crop(im, size: tuple[int, int]):
    """torchvision's Resize(shorter side) + CenterCrop, pixel for pixel on square targets.

    The binding side is scaled to the target and the other is truncated as torchvision does
    (`int(target * long / short)`); the crop offset is rounded as CenterCrop rounds it.
    """
    from PIL import Image

    th, tw = size
    if th / im.height >= tw / im.width:
        nh, nw = th, max(tw, int(th * im.width / im.height))
    else:
        nh, nw = max(th, int(tw * im.height / im.width)), tw
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    return im.crop((left, top, left + tw, top + th))


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with codecs.open_image(path) as im:
            return im.height, im.width
    except codecs.pil_errors() as e:
        raise LoadbenchError(
            f"cannot read image {path}: {codecs.pil_message(e)}; replace or remove the file"
        ) from None


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class FileSplit(RawSplit):
    """A split of image files: decoded on demand, several files at a time (PIL releases the GIL)."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: tuple[int, int], channels: int):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = size
        self.channels = channels

    def _read(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.size, self.channels)

    def load(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.size, self.channels), dtype=np.uint8)
        with ThreadPoolExecutor(_threads()) as pool:
            for k, arr in enumerate(pool.map(self._read, (int(i) for i in indices))):
                out[k] = arr
        return out

    def corrupt(self, indices: np.ndarray) -> np.ndarray:
        def broken(i: int) -> bool:
            try:
                self._read(i)
            except LoadbenchError:
                return True
            return False

        with ThreadPoolExecutor(_threads()) as pool:
            flags = list(pool.map(broken, (int(i) for i in indices)))
        return np.flatnonzero(flags)

    def original_sizes(self, indices: np.ndarray) -> OriginalSizes:
        with ThreadPoolExecutor(_threads()) as pool:
            hw = np.array(list(pool.map(lambda i: image_size(self.paths[i]), indices)))
        hw = hw.reshape(-1, 2)
        nbytes = np.array([os.path.getsize(self.paths[i]) for i in indices], dtype=np.int64)
        return OriginalSizes(width=hw[:, 1], height=hw[:, 0], file_bytes=nbytes)
