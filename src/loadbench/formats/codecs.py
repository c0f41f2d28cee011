"""Image codecs shared by the formats that store encoded images (files, webdataset, tfrecord),
and the one way loadbench hands untrusted image bytes to a decoder. JPEG and PNG are here;
JPEG 2000 and WebP (files-jp2, files-webp) declare their options and encoders in
`pillow_codecs.py` and are decoded here too.

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
from loadbench.formats import libpng, pillow_codecs, turbojpeg
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
EXTENSIONS = {"jpeg": "jpg", "png": "png", "jp2": "jp2", "webp": "webp"}

JPEG_SOI = b"\xff\xd8"
# SOFn markers: C0-CF but DHT (C4), JPG (C8) and DAC (CC). They carry the frame's size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])


class BadImage(ValueError):
    """Bytes that are no decodable image, or one of another size than expected. The reader that
    got them says where they came from."""


def encode(image: np.ndarray, codec: str, options: dict) -> bytes:
    """uint8 (H, W, C) -> JPEG, PNG, JP2 or WebP bytes (`EXTENSIONS`' codecs)."""
    from PIL import Image

    im = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if codec in pillow_codecs.PIL_FORMATS:
        return pillow_codecs.encode(im, codec, options)
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


def is_lossy(codec: str, options: dict) -> bool:
    """Whether `codec` with `options` decodes to other pixels than went in: JPEG always, PNG
    never, JPEG 2000 and WebP when their lossy option is set."""
    if codec in pillow_codecs.PIL_FORMATS:
        return pillow_codecs.is_lossy(codec, options)
    return codec == "jpeg"


def decode(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG, PNG, JP2 or WebP bytes -> uint8 (H, W, C); `BadImage` for a broken image, or for
    one whose header says another size than `size` (H, W) or more pixels than `max_pixels()`,
    before its pixels are decoded.

    JPEG goes to libjpeg-turbo: TurboJPEG where the system has it (`turbojpeg.py`: 1.7x the op
    below on 32x32 images, the same pixels), else torchvision's decode_jpeg op, 2.4-2.7x
    Pillow's speed on 32x32 images, the header walk and the copy to (H, W, C) included (0.85x
    bare decode_jpeg; 1.0x at 256x256); 5,400 fuzzed JPEGs only ever made it raise.

    PNG goes to libpng's simplified API where the system has it and the PNG is one whose pixels
    it gives as Pillow does (`libpng.py`: 1.85x Pillow on 32x32 images), else to Pillow,
    0.6-0.7x decode_png's speed at 32x32 and 0.9x at 256x256:
    torchvision's decode_png kills the process (SIGSEGV) on any libpng error met while reading
    rows (a flipped bit in IDAT, or a crafted file with valid CRCs and a bad filter byte), and
    proving a PNG safe for it (CRCs, inflate, filter bytes) leaves it no faster than Pillow at
    32x32 and at 0.6x Pillow's speed at 256x256. One core, from memory:
    benchmarks/decode_guard.py, 2026-12-04.

    JP2 and WebP go to Pillow (OpenJPEG, libwebp), told apart by their magic bytes: 70-80 us
    a WebP of up to 32x32, 190-550 us a JP2 of 8x8 to 32x32 (one core, Pillow 13).

    Inside a loader's batch, the call's time and `data`'s size count as its decode time and
    bytes read (`stages.py`): 0.25 us a call, 0.03 us outside a loader.
    """
    counting = stages.counting()
    if counting is None:
        return _decode(data, channels, size)
    started = perf_counter_ns()
    image = _decode(data, channels, size)
    counting.decoded(perf_counter_ns() - started, len(data))
    return image


def decode_into(data: bytes | bytearray, out: np.ndarray) -> None:
    """`decode` of an image of `out`'s (H, W, C) shape, written into `out`: a batch decodes
    straight into its own array. The decoders, checks and counts are `decode`'s."""
    counting = stages.counting()
    started = perf_counter_ns() if counting is not None else 0
    h, w, c = out.shape
    if data[:2] == JPEG_SOI:
        image = _decode_jpeg(data, c, (h, w), out)
    else:  # libpng takes PNGs only (by their signature): JP2 and WebP go on to Pillow
        image = out if libpng.decode_into(data, out) else None
    if image is None:
        out[...] = decode_pil(data, c, (h, w))
    elif image is not out:
        out[...] = image
    if counting is not None:
        counting.decoded(perf_counter_ns() - started, len(data))


def _decode(data: bytes, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    if data[:2] == JPEG_SOI:
        image = _decode_jpeg(data, channels, size)
    elif size is not None and libpng.available():  # libpng needs the size first
        image = np.empty((*size, channels), np.uint8)
        image = image if libpng.decode_into(data, image) else None
    else:
        image = None
    return decode_pil(data, channels, size) if image is None else image


def _decode_jpeg(data: bytes | bytearray, channels: int, size: tuple[int, int] | None,
                 out: np.ndarray | None = None) -> np.ndarray | None:  # fmt: skip
    """A JPEG's pixels (H, W, C): written into `out` by TurboJPEG where it is installed
    (`turbojpeg.py`), else by torchvision's op; None for Pillow to decode, or to say what is
    wrong with it (a header the walk cannot read, an error of libjpeg-turbo)."""
    declared = jpeg_size(data)
    if declared is None:
        return None
    _check_size(declared, size)
    _check_pixels(declared)
    if turbojpeg.available():
        target = np.empty((*declared, channels), np.uint8) if out is None else out
        if turbojpeg.decode_into(data, target):
            return target
    torch, decode_jpeg, modes = _torchvision_jpeg()
    encoded = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data),
                               dtype=torch.uint8)  # fmt: skip
    try:
        image = decode_jpeg(encoded, modes[channels == 1], False)
    except RuntimeError:
        return None  # Pillow decodes what libjpeg-turbo refuses, or says what is wrong
    _check_size(image.shape[1:], size)
    return image.permute(1, 2, 0).numpy()  # the op's (C, H, W) is a view of (H, W, C) pixels


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


@functools.cache
def _torchvision_jpeg():
    """(torch, torchvision's decode_jpeg op, its (RGB, GRAY) mode numbers), imported on first
    use, once. The op is called without `torchvision.io.decode_jpeg`, whose checks, API-usage
    log and deprecation warning cost a 32x32 image's decode 20% (6 of 30 us)."""
    import torch
    from torchvision.io import ImageReadMode

    return torch, torch.ops.image.decode_jpeg, (ImageReadMode.RGB.value, ImageReadMode.GRAY.value)


def load_jpeg_decoder() -> None:
    """Load the JPEG decoder now (in a loader's main process, so that workers forked from it
    do not each import torchvision in their first batch)."""
    if not turbojpeg.available():
        _torchvision_jpeg()


def decode_pil(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG, PNG, JP2 or WebP bytes -> uint8 (H, W, C) with Pillow; `BadImage` as `decode`.
    Pillow tries no other format (JP2 or WebP only when the magic bytes say so): a store holds
    these only, and each other decoder is more C code that hostile bytes could reach. Grey
    WebP, stored as R=G=B, comes back exactly as L (Pillow's luma weights sum to 1)."""
    known = pillow_codecs.pil_format(data)
    try:
        with open_image(io.BytesIO(data), formats=(known,) if known else ("JPEG", "PNG")) as im:
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
    limit = _pil_image().MAX_IMAGE_PIXELS  # read at each call: a program may change it
    return None if limit is None else 2 * int(limit)


@functools.cache
def _pil_image():
    """`PIL.Image`, imported once (an import statement per image costs a 32x32 JPEG 3%)."""
    from PIL import Image

    return Image


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
