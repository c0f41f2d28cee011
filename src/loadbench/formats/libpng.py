"""PNG decoding straight into a batch's array with libpng's simplified API (ctypes), where the
system has libpng 1.6 (Debian: libpng16-16); `codecs` falls back to Pillow else.

Why: Pillow spends ~45 of a 32x32 PNG's ~60 us in Python (opening the file object, its plugin's
chunk reader, `tobytes`); `png_image_finish_read` decodes it in ~30 us with the ctypes calls
(1.85x) and writes the rows where they go, 1.1x Pillow on 512x512 images (2026-12-05, one core
of this 2-core Xeon). ctypes lets go of the GIL during the calls, so threads decode in parallel.

libpng's simplified API catches its own errors (`png_safe_execute`: an error is a return value,
never a dead process, unlike torchvision's decode_png). Only PNGs whose pixels are the same bit
for bit as Pillow's take this path: 8-bit RGB read as RGB or 8-bit grayscale read as gray, with
none of the chunks that make libpng convert colours (gAMA, cHRM, sRGB, iCCP, sBIT, tRNS, PLTE).
Any other PNG, a frame of another size than the caller's array, or any warning or error returns
False: the caller decodes the image with Pillow, which also says what is wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import struct

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {3: 2, 1: 0}  # channels -> the PNG colour type read as it is (RGB, gray)
_FORMATS = {3: 2, 1: 0}  # channels -> PNG_FORMAT_RGB, PNG_FORMAT_GRAY
_CONVERTING = frozenset([b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"tRNS", b"PLTE"])
_MOST_CHUNKS = 64  # chunks looked at before IDAT; more: Pillow reads it


class _Image(ctypes.Structure):
    """libpng's `png_image`."""

    _fields_ = [  # noqa: RUF012 (ctypes' declaration)
        ("opaque", ctypes.c_void_p), ("version", ctypes.c_uint32), ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32), ("format", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("colormap_entries", ctypes.c_uint32), ("warning_or_error", ctypes.c_uint32),
        ("message", ctypes.c_char * 64),
    ]  # fmt: skip


def available() -> bool:
    """Whether libpng 1.6 is there (and not turned off with LOADBENCH_LIBPNG=0)."""
    return _library() is not None


@functools.cache
def _library():
    if os.environ.get("LOADBENCH_LIBPNG", "1") == "0":
        return None
    name = ctypes.util.find_library("png16")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if lib is None or not hasattr(lib, "png_image_begin_read_from_memory"):
        return None
    image_p = ctypes.POINTER(_Image)
    lib.png_image_begin_read_from_memory.argtypes = [image_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.png_image_finish_read.argtypes = [image_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int32, ctypes.c_void_p]  # fmt: skip
    lib.png_image_free.argtypes = [image_p]
    return lib


def plain(data: bytes, channels: int) -> bool:
    """Whether `data` is a PNG that libpng reads as Pillow does: 8-bit, of the colour type
    `channels` asks for, and none of the chunks before its pixels makes libpng convert them."""
    if data[:8] != _SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return False
    if data[24] != 8 or data[25] != _COLOUR_TYPES.get(channels):  # bit depth, colour type
        return False
    pos = 8
    for _ in range(_MOST_CHUNKS):
        if pos + 8 > len(data):
            return False
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            return True
        if kind in _CONVERTING:
            return False
        pos += 12 + length
    return False


def decode_into(data: bytes, out: np.ndarray) -> bool:
    """Decode PNG `data` into `out` (H, W, C uint8, C-contiguous, C 1 or 3); False (and `out`
    unspecified) when libpng is not there or the PNG does not take this path (module doc)."""
    lib = _library()
    h, w, c = out.shape
    if lib is None or out.dtype != np.uint8 or not out.flags.c_contiguous:
        return False
    if not isinstance(data, bytes) or not plain(data, c):
        return False
    image = _Image(version=1)
    ref = ctypes.byref(image)
    if not lib.png_image_begin_read_from_memory(ref, data, len(data)):
        lib.png_image_free(ref)
        return False
    image.format = _FORMATS[c]
    if (image.height, image.width) != (h, w) or image.warning_or_error:
        lib.png_image_free(ref)
        return False
    done = lib.png_image_finish_read(ref, None, out.ctypes.data, w * c, None)
    if not done or image.warning_or_error:
        lib.png_image_free(ref)  # finish_read frees on success; after a failure it may not
        return False
    return True
