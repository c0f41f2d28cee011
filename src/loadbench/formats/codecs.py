"""Image codecs shared by the formats that store encoded images (files, webdataset, tfrecord),
and the one way loadbench hands untrusted image bytes to a decoder.

Image bytes are where damaged or hostile input meets C code, so `decode` picks per codec a
decoder that answers a broken image with an exception, never with a dead process, and checks
the size the header declares before a pixel is decoded.
"""

from __future__ import annotations

import functools
import io
import re
import struct
from time import perf_counter_ns

import numpy as np

from loadbench import stages
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

JPEG_SOI = b"\xff\xd8"
# SOFn markers: C0-CF but DHT (C4), JPG (C8) and DAC (CC). They carry the frame's size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])


class BadImage(ValueError):
    """Bytes that are no decodable image, or one of another size than expected. The reader that
    got them says where they came from."""


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


def decode(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 (H, W, C); `BadImage` for a broken image, or for one whose
    header says another size than `size` (H, W) or more pixels than `max_pixels()`, before its
    pixels are decoded.

    JPEG goes to torchvision.io (libjpeg-turbo): 2.4-2.7x Pillow's speed on 32x32 images, the
    header walk and the copy to (H, W, C) included (0.85x bare decode_jpeg; 1.0x at 256x256);
    5,400 fuzzed JPEGs only ever made it raise. PNG goes to Pillow, 0.6-0.7x decode_png's speed at
    32x32 and 0.9x at 256x256: torchvision's decode_png kills the process (SIGSEGV) on any libpng
    error met while reading rows (a flipped bit in IDAT, or a crafted file with valid CRCs and a
    bad filter byte), and proving a PNG safe for it (CRCs, inflate, filter bytes) leaves it no
    faster than Pillow at 32x32 and at 0.6x Pillow's speed at 256x256. One core, from memory:
    benchmarks/decode_guard.py, 2026-12-04.

    Inside a loader's batch, the call's time and `data`'s size count as its decode time and
    bytes read (`stages.py`): 0.25 us a call, 0.03 us outside a loader.
    """
    counting = stages.current
    if counting is None:
        return _decode(data, channels, size)
    started = perf_counter_ns()
    image = _decode(data, channels, size)
    counting.decoded(perf_counter_ns() - started, len(data))
    return image


def _decode(data: bytes, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    if data[:2] == JPEG_SOI and (declared := jpeg_size(data)) is not None:
        _check_size(declared, size)
        _check_pixels(declared)
        try:
            image = _decode_torchvision_jpeg(data, channels)
        except RuntimeError:
            pass  # Pillow decodes what libjpeg-turbo refuses, or says what is wrong
        else:
            _check_size(image.shape[:2], size)
            return image
    return decode_pil(data, channels, size)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, walked marker by marker as libjpeg does;
    None when the walk meets anything else. Checked before decoding: a forged header can declare
    65,500 x 65,500 pixels in a few hundred bytes, and libjpeg-turbo fills every row."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF_MARKERS:
            return struct.unpack_from(">HH", data, pos + 5) if pos + 9 <= end else None
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _decode_torchvision_jpeg(data: bytes, channels: int) -> np.ndarray:
    torch, decode_jpeg, modes = _torchvision_jpeg()
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(encoded, mode=modes[channels == 1]).permute(1, 2, 0).numpy()


@functools.cache
def _torchvision_jpeg():
    """(torch, decode_jpeg, (RGB, GRAY) modes), imported on first use, once: the imports cost
    a 32x32 image's decode 5% when done at each call."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    return torch, decode_jpeg, (ImageReadMode.RGB, ImageReadMode.GRAY)


def decode_pil(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 (H, W, C) with Pillow; `BadImage` as `decode`. Pillow tries
    no other format: a store holds JPEG and PNG only, and each other decoder is more C code that
    hostile bytes could reach."""
    try:
        with open_image(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
            _check_size((im.height, im.width), size)
            mode = "L" if channels == 1 else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
    except pil_errors() as e:
        raise BadImage(pil_message(e)) from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_size(found: tuple[int, int], size: tuple[int, int] | None) -> None:
    if size is not None and tuple(found) != tuple(size):
        raise BadImage(f"the image is {found[0]}x{found[1]}, {size[0]}x{size[1]} expected")


def _check_pixels(found: tuple[int, int]) -> None:
    """Pillow's refusal of a decompression bomb, for the decoders that have none."""
    limit = max_pixels()
    if limit is not None and found[0] * found[1] > limit:
        raise BadImage(_bomb_message(found[0] * found[1]))


# -- Pillow, its refusal of decompression bombs said as a broken image --------------------------


def open_image(fp, formats: tuple[str, ...] | None = None):
    """`PIL.Image.open` (of the `formats` given, or of any), with Pillow's refusal of an image
    over `max_pixels()` raised as `BadImage` that says how many pixels it has and the limit.

    Pillow refuses at open, from the header: a PNG of 30,000 x 30,000 pixels is a few hundred
    KiB on disk and 2.7 GB decoded. The limit is Pillow's (twice `PIL.Image.MAX_IMAGE_PIXELS`),
    so a program that raises Pillow's raises loadbench's too. Between once and twice that
    Pillow only warns, and the image is decoded.
    """
    from PIL import Image

    try:
        return Image.open(fp, formats=formats)
    except Image.DecompressionBombError as e:
        raise BadImage(_bomb_message(e)) from None


def max_pixels() -> int | None:
    """The most pixels an image may have (Pillow's refusal limit; None: none)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _bomb_message(error: Exception | int) -> str:
    """The message for an image over `max_pixels()`, from its pixel count or Pillow's error."""
    if isinstance(error, int):
        pixels = f"{error:,} pixels"
    else:
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (
        f"it has {pixels}, over the limit of {max_pixels() or 0:,} (twice "
        "PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb, or an image too large to decode"
    )


def pil_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for bytes that are not a good image (its plugins raise all of these,
    not only OSError), for callers that turn them into one error naming the file."""
    import zlib

    from PIL import Image

    return (
        OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
        Image.DecompressionBombError,
    )  # fmt: skip


def pil_message(error: BaseException) -> str:
    """What is wrong with an image, from an error of `pil_errors()` (the bomb one said as
    `open_image` says it)."""
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        return _bomb_message(error)
    return str(error) or type(error).__name__


def check_quality(format_name: str, options: dict) -> None:
    from loadbench.errors import LoadbenchError

    quality = options.get("jpeg_quality")
    if quality is not None and not 1 <= quality <= 100:
        raise LoadbenchError(f"{format_name} option jpeg_quality={quality} must be 1..100")
