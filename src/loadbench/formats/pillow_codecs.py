"""JPEG 2000 (OpenJPEG) and WebP (libwebp), both through Pillow: their options, their encoders,
when they are lossy, and the magic bytes that tell their files apart.

Their bytes are decoded where every codec's are, by `codecs.decode` (Pillow, restricted to the
one plugin the magic names, with the header's size and pixel count checked before a pixel is
decoded). Both are lossless unless their lossy option is set.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.options import Option

JP2_OPTIONS = {
    "jp2_rate": Option(
        None,
        "JPEG 2000 compression ratio, e.g. 10 or 20 (lossy); none: lossless (5/3 wavelet)",
        kind=float,
        above=1,
    ),
}
WEBP_OPTIONS = {
    "webp_quality": Option(
        None, "WebP quality 1-100 (lossy); none: lossless", kind=int, minimum=1, maximum=100
    ),
}

# Pillow's plugin of each codec, and the feature (`PIL.features.check`) and library it needs.
PIL_FORMATS = {"jp2": "JPEG2000", "webp": "WEBP"}
_FEATURES = {"jp2": ("jpg_2000", "OpenJPEG"), "webp": ("webp", "libwebp")}

# A JP2 file's first box (we write JP2 files, never bare J2K codestreams).
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

# Lossless WebP's effort, measured on 32x32 and 64x64 RGB images and 8x8 digits (one core,
# Pillow 13 / libwebp 1.6): method 0 encodes fastest (160-270 us an image) but its files are up
# to 1.65x those of method 1 (200-1,300 us); method 2 is no better than 1, and methods 3-6 take
# 1.5-10x method 1's time for files no smaller (larger, at these sizes). Lossless `quality` is
# effort too: 0 gives files within 6% of 100's in 0.5-0.6x the time.
_WEBP_LOSSLESS = {"lossless": True, "method": 1, "quality": 0}


def pil_format(data: bytes | bytearray) -> str | None:
    """Pillow's plugin for JP2 or WebP bytes, told by their magic; None for any other bytes."""
    if data[:12] == JP2_SIGNATURE:
        return "JPEG2000"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def encode(im: Any, codec: str, options: dict[str, Any]) -> bytes:
    """A Pillow image (mode L or RGB) -> JP2 or WebP bytes, lossless unless the codec's lossy
    option is set."""
    buffer = io.BytesIO()
    if codec == "jp2":
        rate = options.get("jp2_rate")
        # No quality layers: OpenJPEG codes every bit plane, so the reversible 5/3 wavelet is
        # exact. A JP2 file (not a bare codestream): 85 bytes more, and what `.jp2` means.
        # A rate divides the raw size, headers included, so small images reach a floor of
        # ~250 bytes: 28x28 grey gets 27 dB at any rate from 4 up, 8x8 digits 15 dB at any.
        lossy = {"quality_mode": "rates", "quality_layers": [rate]} if rate is not None else {}
        im.save(buffer, "JPEG2000", irreversible=rate is not None, **lossy)
    else:
        quality = options.get("webp_quality")
        # WebP holds RGB(A) only: grey is stored as R=G=B (lossless: exactly; libwebp's
        # subtract-green transform makes it cost little) and decoded back to L.
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        settings = _WEBP_LOSSLESS if quality is None else {"quality": quality}
        rgb.save(buffer, "WEBP", **settings)
    return buffer.getvalue()


def is_lossy(codec: str, options: dict[str, Any]) -> bool:
    """Whether the codec's lossy option is set (both are lossless by default)."""
    return options.get({"jp2": "jp2_rate", "webp": "webp_quality"}[codec]) is not None


def check_options(format_name: str, options: dict[str, Any]) -> None:
    """Refuse a `jp2_rate` that is no compression ratio and a `webp_quality` outside 1..100."""
    rate = options.get("jp2_rate")
    if rate is not None and not (math.isfinite(rate) and rate > 1):
        raise LoadbenchError(
            f"{format_name} option jp2_rate={rate:g} must be a compression ratio over 1 (e.g. "
            "10 or 20); leave it out for lossless"
        )
    quality = options.get("webp_quality")
    if quality is not None and not 1 <= quality <= 100:
        raise LoadbenchError(
            f"{format_name} option webp_quality={quality} must be 1..100; leave it out for lossless"
        )


@functools.cache
def missing(codec: str) -> str | None:
    """Why Pillow here cannot encode or decode `codec` (built without its library), else None."""
    from PIL import features

    feature, library = _FEATURES[codec]
    if features.check(feature):
        return None
    return (
        f"this Pillow was built without {library} ({PIL_FORMATS[codec]} support): install a "
        "Pillow wheel from PyPI (pip install --force-reinstall pillow), which includes it"
    )
