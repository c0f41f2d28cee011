"""Does the guarded decode stay fast for good files? `codecs.decode` against the raw decoders.

`loadbench.formats.codecs.decode` is the one way loadbench hands untrusted image bytes to a
decoder: it walks a JPEG's markers to check the size its header declares (and the pixel limit)
before libjpeg-turbo fills a row, sends PNG to Pillow (torchvision's decode_png kills the process
on a libpng error), and turns every failure into `BadImage`. This measures what that costs on
good files, in one run, on one core, from memory (no file reads): images/s of

- torchvision.io: `decode_jpeg` / `decode_png` on the bytes, nothing checked;
- Pillow: `Image.open` + `np.asarray`, nothing checked;
- loadbench: `codecs.decode` as shipped;
- PNG only, not shipped: torchvision's `decode_png` after proving the file safe for it in
  Python (chunk CRCs, inflate, every row's filter byte), the price of keeping libpng's speed.

and the ratio loadbench / the fastest raw decoder (1.00: as fast). Images are `synthetic:`
sources' (smooth shapes on textured backgrounds), encoded as loadbench stores them: JPEG q90
4:4:4, PNG zlib level 6. Each rate is the best of `--repeats` passes over `--count` distinct
images, the decoders interleaved pass by pass so that a busy neighbour hits all of them alike.
Compare within one run; nothing is asserted.

    python benchmarks/decode_guard.py [--count 2000] [--repeats 5] [--sizes 32,256]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shlex
import struct
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs

import loadbench
from loadbench.formats import codecs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def torchvision_decoder(codec: str) -> Callable[[bytes], object]:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    raw = decode_jpeg if codec == "jpeg" else decode_png

    def decode(data: bytes):
        return raw(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return decode


def pillow_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)


def png_proved_safe(data: bytes) -> None:
    """What decode_png would need checked first, in Python: the chunks and their CRCs, the
    inflated rows, and each row's filter byte (non-interlaced 8-bit RGB/gray only)."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG")
    pos, idat, width = 8, [], None
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + body) != crc:
            raise ValueError("bad CRC")
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            channels = {0: 1, 2: 3}[color]
            if depth != 8 or interlace:
                raise ValueError("not handled here")
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    stride = width * channels + 1
    rows = zlib.decompress(b"".join(idat))
    if len(rows) != stride * height or max(rows[::stride]) > 4:
        raise ValueError("bad rows")


def guarded_torchvision_png() -> Callable[[bytes], object]:
    decode = torchvision_decoder("png")

    def run(data: bytes):
        png_proved_safe(data)
        return decode(data)

    return run


def images(size: int, count: int) -> np.ndarray:
    preset = "cifar-like" if size <= 64 else "tinyimagenet-like"
    spec = f"synthetic:{preset}?size={size}&count={count}&eval_count=0"
    return loadbench.load_source(spec).split("train")[0]


def rates(decoders: dict[str, Callable], data: list[bytes], repeats: int) -> dict[str, float]:
    for decode in decoders.values():  # the first call imports and warms each decoder
        decode(data[0])
    best = dict.fromkeys(decoders, 0.0)
    for _ in range(repeats):
        for name, decode in decoders.items():
            t0 = time.perf_counter()
            for item in data:
                decode(item)
            best[name] = max(best[name], len(data) / (time.perf_counter() - t0))
    return best


def machine() -> str:
    model = cpu_model()
    from PIL import __version__ as pillow
    from torchvision import __version__ as torchvision

    libraries = f"torchvision {torchvision}, Pillow {pillow}"
    return f"{model}, {os.cpu_count()} CPUs, one thread; {libraries}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="distinct images per size")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the best counts")
    parser.add_argument("--sizes", default="32,256", help="image sides in pixels")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {machine()}")
    print(f"command: python {shlex.join(sys.argv)}")
    print()
    header = (
        f"{'image':14s} {'KiB':>5s} {'torchvision':>11s} {'Pillow':>8s} {'loadbench':>9s} "
        f"{'tv+check':>8s}   loadbench / fastest raw"
    )
    print(header)
    print("-" * len(header))
    options = {name: o.default for name, o in {**codecs.JPEG_OPTIONS, **codecs.PNG_OPTIONS}.items()}
    for size in (int(s) for s in args.sizes.split(",")):
        count = args.count if size <= 64 else max(1, args.count // 8)
        pixels = images(size, count)
        for codec in ("jpeg", "png"):
            data = [codecs.encode(image, codec, options) for image in pixels]
            decoders = {
                "torchvision": torchvision_decoder(codec),
                "Pillow": pillow_decode,
                "loadbench": lambda b: codecs.decode(b, 3),
            }
            if codec == "png":
                decoders["tv+check"] = guarded_torchvision_png()
            for check in decoders.values():  # every decoder gives the same pixels
                out = check(data[0])
                out = out.permute(1, 2, 0).numpy() if isinstance(out, torch.Tensor) else out
                np.testing.assert_array_equal(out, codecs.decode(data[0], 3))
            got = rates(decoders, data, args.repeats)
            fastest = max(got["torchvision"], got["Pillow"])
            kib = sum(map(len, data)) / len(data) / 1024
            label = f"{size}x{size} {codec}"
            guarded = f"{got['tv+check']:8,.0f}" if "tv+check" in got else f"{'-':>8s}"
            print(
                f"{label:14s} {kib:5.1f} {got['torchvision']:11,.0f} "
                f"{got['Pillow']:8,.0f} {got['loadbench']:9,.0f} {guarded}   "
                f"{got['loadbench'] / fastest:.2f}",
                flush=True,
            )
    print(
        "\nimages/s, one core, from memory, best of the passes; KiB: mean encoded size. "
        "tv+check: decode_png after the Python check that would make it safe (not shipped)."
    )


if __name__ == "__main__":
    main()
