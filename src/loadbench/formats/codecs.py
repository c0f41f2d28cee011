"""Image codecs shared by the formats that store encoded images (files, webdataset, tfrecord)."""

from __future__ import annotations

import io

import numpy as np

from loadbench.formats.base import Option

JPEG_OPTIONS = {
    "jpeg_quality": Option(90, "JPEG quality 1-100", kind=int, minimum=1),
    "jpeg_subsampling": Option(
        "4:4:4",
        "JPEG chroma subsampling (4:2:0, PIL's default, costs ~5 dB on 32x32 images)",
        choices=("4:4:4", "4:2:2", "4:2:0"),
    ),
}
PNG_OPTIONS = {
    "png_compression": Option(6, "PNG zlib level 0-9", choices=tuple(range(10)), kind=int),
}
EXTENSIONS = {"jpeg": "jpg", "png": "png"}


def encode(image: np.ndarray, codec: str, options: dict) -> bytes:
    """uint8 (H, W, C) -> JPEG or PNG bytes."""
    from PIL import Image

    im = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    if codec == "jpeg":
        im.save(
            buffer,
            "JPEG",
            quality=options["jpeg_quality"],
            subsampling=options["jpeg_subsampling"],
        )
    else:
        im.save(buffer, "PNG", compress_level=options["png_compression"])
    return buffer.getvalue()


def decode(data: bytes, channels: int) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 (H, W, C). Raises OSError/ValueError on a broken image.

    Decodes with torchvision.io (libjpeg-turbo, libpng), measured faster than Pillow here with
    the same pixels: 32x32 JPEG q90 60k/s vs 15k/s, PNG 32k/s vs 20k/s; 256x256 JPEG 5.0k/s vs
    3.7k/s (one core). What it cannot decode goes to Pillow, which names the problem.
    """
    try:
        return _decode_torchvision(data, channels)
    except RuntimeError:
        return decode_pil(data, channels)


def _decode_torchvision(data: bytes, channels: int) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    if data[:2] == b"\xff\xd8":
        image = decode_jpeg(encoded, mode=mode)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        image = decode_png(encoded, mode=mode)
    else:
        raise RuntimeError("neither JPEG nor PNG")
    return image.permute(1, 2, 0).numpy()


def decode_pil(data: bytes, channels: int) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 (H, W, C) with Pillow."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        mode = "L" if channels == 1 else "RGB"
        if im.mode != mode:
            im = im.convert(mode)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def check_quality(format_name: str, options: dict) -> None:
    from loadbench.errors import LoadbenchError

    quality = options.get("jpeg_quality")
    if quality is not None and not 1 <= quality <= 100:
        raise LoadbenchError(f"{format_name} option jpeg_quality={quality} must be 1..100")
