"""JPEG decoding straight into a batch's array with libjpeg-turbo's TurboJPEG library (ctypes),
where the system has it (Debian: libturbojpeg0); `codecs` falls back to torchvision's op else.

Why: on 32x32 images torchvision's decode_jpeg op costs 23-30 us an image, of which libjpeg-turbo
decodes ~10: the rest is a tensor per image, the dispatcher and a copy out. `tjDecompress2`
writes the pixels where they go, in 17-19 us with the ctypes call (1.7x), and 1.2x faster on
512x512 images (2026-12-05, one core of this 2-core Xeon: `benchmarks/fast_paths.py`). ctypes
lets go of the GIL during the call, so threads decode in parallel.

The same library decodes, with the same settings (accurate DCT, fancy upsampling, libjpeg's
colour conversions), so the pixels are torchvision's, bit for bit (checked in the tests). Any
error or warning (`TJFLAG_STOPONWARNING`), more than 500 scans (`TJFLAG_LIMITSCANS`), or a frame
of another size than the caller's array returns False: the caller decodes the image its other
way, which also says what is wrong. TurboJPEG writes at most the (scaled) frame it reads, never
past the rows and pitch it is given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading

import numpy as np

_PIXEL_FORMATS = {3: 0, 1: 6}  # channels -> TJPF_RGB, TJPF_GRAY
_FLAGS = 8192 | 32768  # TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS
_local = threading.local()


def available() -> bool:
    """Whether TurboJPEG is there (and not turned off with LOADBENCH_TURBOJPEG=0)."""
    return _library() is not None


@functools.cache
def _library():
    if os.environ.get("LOADBENCH_TURBOJPEG", "1") == "0":
        return None
    name = ctypes.util.find_library("turbojpeg")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if lib is None or not hasattr(lib, "tjDecompress2"):
        return None
    c_int_p = ctypes.POINTER(ctypes.c_int)
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjInitDecompress.argtypes = []
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong,
                                        c_int_p, c_int_p, c_int_p, c_int_p]  # fmt: skip
    lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong,
                                  ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int]  # fmt: skip
    return lib


class _Decompressor:
    """A TurboJPEG handle of one thread (handles are not shared between threads), destroyed
    with the thread's `threading.local` data."""

    def __init__(self, lib):
        self.lib, self.handle = lib, lib.tjInitDecompress()
        self.ints = [ctypes.c_int() for _ in range(4)]  # width, height, subsampling, colours
        self.refs = [ctypes.byref(i) for i in self.ints]

    def __del__(self):
        if self.handle:
            self.lib.tjDestroy(self.handle)


def decode_into(data: bytes | bytearray, out: np.ndarray) -> bool:
    """Decode JPEG `data` into `out` (H, W, C uint8, C-contiguous, C 1 or 3); False (and `out`
    unspecified) when TurboJPEG is not there or does not decode it to exactly that shape."""
    lib = _library()
    h, w, c = out.shape
    if (
        lib is None
        or c not in _PIXEL_FORMATS
        or out.dtype != np.uint8
        or not out.flags.c_contiguous
    ):
        return False
    state = getattr(_local, "state", None)
    if state is None or state.lib is not lib:
        state = _local.state = _Decompressor(lib)
    if not state.handle:
        return False
    # bytes go in as they are (c_char_p: no copy); other buffers through a ctypes view
    source = data if isinstance(data, bytes) else (ctypes.c_char * len(data)).from_buffer(data)
    if lib.tjDecompressHeader3(state.handle, source, len(data), *state.refs) != 0:
        return False
    if (state.ints[1].value, state.ints[0].value) != (h, w):
        return False
    done = lib.tjDecompress2(state.handle, source, len(data), out.ctypes.data, w, w * c, h,
                             _PIXEL_FORMATS[c], _FLAGS)  # fmt: skip
    return done == 0
