"""Hostile or damaged image bytes never crash the process (issue 14).

Image bytes are where bad input meets C code: a flipped byte in a PNG's IDAT, a PNG with valid
CRCs and a bad filter byte (libpng errors that kill a process decoding with torchvision's
decode_png), a PNG of 30,000 x 30,000 pixels that is 870 KiB on disk (Pillow's decompression
bomb refusal), a JPEG whose frame header declares 65,000 x 65,000 pixels (libjpeg-turbo would
fill 12 GB of rows). Each must end as one error naming the file, or be skipped and counted with
--skip-corrupt: never a traceback, a signal, or gigabytes decoded. Every file is written here.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loadbench
from loadbench.errors import LoadbenchError
from loadbench.formats import codecs

PYTHON = [sys.executable, "-m", "loadbench"]
SMALL = "synthetic:cifar-like?count=8&eval_count=4&size=16&classes=2"
BOMB_SIDE = 30_000
FORGED_SIDE = 65_000


# -- crafted files ------------------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def zeros_zlib(total: int, block: int = 1 << 20) -> bytes:
    """A valid zlib stream of `total` zero bytes, made in milliseconds: after a full flush the
    compressor starts afresh, so every further block of zeros compresses to the same bytes."""
    count, rest = divmod(total, block)
    c = zlib.compressobj(9)
    first = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(bytes(rest)) + c.flush(zlib.Z_FULL_FLUSH)
    adler = ((total % 65521) << 16) | 1  # Adler-32 of zeros: a = 1, b = total
    return first + again * (count - 1) + tail + c.flush()[:-4] + struct.pack(">I", adler)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid grayscale PNG of side x side black pixels, under 1 MB on disk."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zeros_zlib(side * (side + 1))  # a filter byte, then the row
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def bad_filter_png(data: bytes) -> bytes:
    """The PNG with its first row's filter byte set to 7 (0-4 exist), every CRC valid."""
    out = data[:8]
    for kind, body in png_chunks(data):
        if kind == b"IDAT":
            rows = bytearray(zlib.decompress(body))
            rows[0] = 7
            body = zlib.compress(bytes(rows))
        out += png_chunk(kind, body)
    return out


def flipped_png(data: bytes) -> bytes:
    """The PNG with one byte of its IDAT flipped: the first, from the middle on, that makes
    the pixels undecodable (a flip can also decode, to other pixels, which checksums catch)."""
    (pos,) = [k for k in range(8, len(data)) if data[k - 4 : k] == b"IDAT"]
    (length,) = struct.unpack_from(">I", data, pos - 8)
    for k in range(pos + length // 2, pos + length):
        damaged = bytearray(data)
        damaged[k] ^= 0xFF
        try:
            with Image.open(io.BytesIO(damaged)) as im:
                im.load()
        except (OSError, SyntaxError, ValueError):
            return bytes(damaged)
    raise AssertionError("no flipped byte breaks this PNG")


def forged_jpeg(data: bytes, height: int = FORGED_SIDE, width: int = FORGED_SIDE) -> bytes:
    """The JPEG with its frame header (SOF0/1/2) declaring height x width, nothing else
    changed: a few KiB that ask the decoder for height x width x 3 bytes."""
    data, pos = bytearray(data), 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    struct.pack_into(">HH", data, pos + 5, height, width)
    return bytes(data)


def jpeg_bytes(seed: int = 0, side: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def image_folder(root: Path, *, ext: str = "png", per_class: int = 3) -> Path:
    """root/{a,b}/<n>.<ext>: small good images in ImageFolder layout."""
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{n + 1}.{ext}")
    return root


def store_file(store: Path, ext: str) -> Path:
    """The first image file of the store's train split."""
    return sorted((store / "train").rglob(f"*.{ext}"))[0]


# -- running the command line -------------------------------------------------------------------


def cli(*args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*PYTHON, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},  # a table row stays on one line
    )
    assert done.returncode >= 0, f"killed by {signal.Signals(-done.returncode).name}"
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def failed_row(done: subprocess.CompletedProcess, name: str) -> str:
    """The result of verify's one table row that names `name`, which must say FAIL (exit
    code 1). The table is 160 columns wide: a long result wraps over lines, and a path longer
    than the column is folded, so names are looked for with the whitespace taken out."""
    assert done.returncode == 1, done.stdout + done.stderr
    rows: list[list[str]] = []
    for line in done.stdout.splitlines():
        cells = line.split("│")
        if len(cells) < 3:
            continue
        if cells[1].strip():  # the store column: blank on a row's continuation lines
            rows.append([])
        if rows:
            rows[-1].append(cells[-2].strip())
    results = [" ".join(row) for row in rows]
    (row,) = [r for r in results if name in "".join(r.split())]
    assert row.startswith("FAIL"), row
    return row


# -- (a) damaged PNG files in a store -------------------------------------------------------


@pytest.mark.parametrize("damage", [flipped_png, bad_filter_png], ids=["flipped", "bad-filter"])
@pytest.mark.parametrize("fmt", ["files-png", "torchvision-imagefolder"])
def test_a_damaged_png_in_a_store_fails_verify_naming_the_file(tmp_path, damage, fmt):
    loadbench.convert(SMALL, fmt, tmp_path / "s")
    path = store_file(tmp_path / "s", "png")
    path.write_bytes(damage(path.read_bytes()))
    row = failed_row(cli("verify", tmp_path / "s"), path.name)
    assert "cannot decode" in row or "cannot read" in row, row
    assert "Traceback" not in row


@pytest.mark.parametrize("damage", [flipped_png, bad_filter_png], ids=["flipped", "bad-filter"])
def test_a_damaged_png_read_from_a_store_raises_naming_the_file(tmp_path, damage):
    loadbench.convert(SMALL, "files-png", tmp_path / "s")
    path = store_file(tmp_path / "s", "png")
    path.write_bytes(damage(path.read_bytes()))
    reader = loadbench.open_store(tmp_path / "s").raw("train")
    with pytest.raises(LoadbenchError, match=rf"{path.parent.name}/{path.name}"):
        reader.read_batch(np.arange(reader.count))


@pytest.mark.parametrize("damage", [flipped_png, bad_filter_png], ids=["flipped", "bad-filter"])
def test_decode_answers_a_damaged_png_with_bad_image(damage):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), np.uint8)).save(
        buffer, "PNG"
    )
    with pytest.raises(codecs.BadImage):
        codecs.decode(damage(buffer.getvalue()), 3)


# -- (b) a decompression bomb in a folder source --------------------------------------------


def test_the_bomb_png_is_valid_and_small():
    data = bomb_png()
    assert len(data) < 1_000_000
    ((kind, body),) = [c for c in png_chunks(data) if c[0] == b"IDAT"]
    inflate, total = zlib.decompressobj(), 0
    for start in range(0, len(body), 1 << 16):  # streamed: 900 MB never held at once
        total += len(inflate.decompress(body[start : start + (1 << 16)], 1 << 24))
        while inflate.unconsumed_tail:
            total += len(inflate.decompress(inflate.unconsumed_tail, 1 << 24))
    assert inflate.eof and total == BOMB_SIDE * (BOMB_SIDE + 1)


@pytest.mark.parametrize("first", [False, True], ids=["later-file", "first-file"])
def test_a_png_bomb_in_a_folder_source_is_named_or_skipped(tmp_path, first):
    root = image_folder(tmp_path / "tree")
    bomb = root / "a" / ("0.png" if first else "9.png")  # 0.png sorts first, sizing the source
    bomb.write_bytes(bomb_png())
    line = one_line_error(cli("convert", f"folder:{root}", "-f", "npy", "-o", tmp_path / "o1"))
    assert str(bomb) in line
    assert f"{BOMB_SIDE**2:,} pixels" in line and f"{codecs.max_pixels():,}" in line, line
    assert "--skip-corrupt" in line

    done = cli("convert", f"folder:{root}", "-f", "npy", "-o", tmp_path / "o2", "--skip-corrupt")
    assert done.returncode == 0, done.stderr
    assert "train: skipped 1 corrupt image(s)" in done.stderr + done.stdout
    assert loadbench.open_store(tmp_path / "o2").counts == {"train": 6}


def test_a_png_bomb_in_the_api_is_named_or_skipped(tmp_path):
    root = image_folder(tmp_path / "tree")
    (root / "b" / "9.png").write_bytes(bomb_png())
    with pytest.raises(LoadbenchError, match=r"b/9\.png: it has 900,000,000 pixels, over"):
        loadbench.load_source(f"folder:{root}").split("train")
    source = loadbench.load_source(f"folder:{root}", skip_corrupt=True)
    assert source.count("train") == 6 and "train: skipped 1 corrupt image(s)" in source.notes


def test_a_png_bomb_in_an_imagefolder_peer_store_is_named(tmp_path):
    loadbench.convert(SMALL, "torchvision-imagefolder", tmp_path / "s")
    path = store_file(tmp_path / "s", "png")
    path.write_bytes(bomb_png())
    reader = loadbench.open_store(tmp_path / "s").raw("train")
    with pytest.raises(LoadbenchError, match=rf"{path.name}: it has 900,000,000 pixels"):
        reader.read_batch(np.arange(reader.count))
    index = int(path.stem)
    with pytest.raises(LoadbenchError, match=rf"{path.name}: it has 900,000,000 pixels"):
        reader.samples([index])  # the DataLoader's path
    failed_row(cli("verify", tmp_path / "s"), path.name)


# -- (c, d) a JPEG whose header declares 65,000 x 65,000 pixels -----------------------------


def test_a_forged_jpeg_header_is_refused_before_decoding():
    forged = forged_jpeg(jpeg_bytes())
    assert codecs.jpeg_size(forged) == (FORGED_SIDE, FORGED_SIDE)
    pixels = f"{FORGED_SIDE**2:,} pixels"
    with pytest.raises(codecs.BadImage, match=pixels):
        codecs.decode(forged, 3)  # no size known: webdataset, tfrecord
    with pytest.raises(codecs.BadImage, match=r"65000x65000, 16x16 expected"):
        codecs.decode(forged, 3, (16, 16))  # files-jpeg
    with pytest.raises(codecs.BadImage, match=pixels):
        codecs.decode_pil(forged, 3)
    # a good JPEG still decodes as before
    assert codecs.decode(jpeg_bytes(), 3).shape == (16, 16, 3)


def test_a_forged_jpeg_in_a_folder_source_is_named_or_skipped(tmp_path):
    root = image_folder(tmp_path / "tree", ext="jpg")
    path = root / "b" / "3.jpg"
    path.write_bytes(forged_jpeg(path.read_bytes()))
    line = one_line_error(cli("convert", f"folder:{root}", "-f", "npy", "-o", tmp_path / "o1"))
    assert str(path) in line and f"{FORGED_SIDE**2:,} pixels" in line, line
    done = cli("convert", f"folder:{root}", "-f", "npy", "-o", tmp_path / "o2", "--skip-corrupt")
    assert done.returncode == 0, done.stderr
    assert "train: skipped 1 corrupt image(s)" in done.stderr + done.stdout


def test_a_forged_jpeg_first_in_a_folder_source_is_named(tmp_path):
    root = image_folder(tmp_path / "tree", ext="jpg")
    path = root / "a" / "1.jpg"  # the file that gives the source its size
    path.write_bytes(forged_jpeg(path.read_bytes()))
    line = one_line_error(cli("convert", f"folder:{root}", "-f", "npy", "-o", tmp_path / "o"))
    assert str(path) in line and f"{FORGED_SIDE**2:,} pixels" in line, line
    assert "--skip-corrupt" in line


def test_a_forged_jpeg_in_a_files_jpeg_store_is_named(tmp_path):
    loadbench.convert(SMALL, "files-jpeg", tmp_path / "s")
    path = store_file(tmp_path / "s", "jpg")
    path.write_bytes(forged_jpeg(path.read_bytes()))
    row = failed_row(cli("verify", tmp_path / "s"), path.name)
    assert "the image is 65000x65000, 16x16 expected" in row, row
    reader = loadbench.open_store(tmp_path / "s").raw("train")
    with pytest.raises(LoadbenchError, match=rf"{path.parent.name}/{path.name}: the image is 650"):
        reader.read_batch(np.arange(reader.count))


def test_a_forged_jpeg_in_a_webdataset_shard_is_refused(tmp_path):
    loadbench.convert(SMALL, "webdataset", tmp_path / "s", encoding="jpeg")
    (shard,) = sorted((tmp_path / "s").rglob("train*.tar"))
    data = bytearray(shard.read_bytes())
    start = data.index(b"\xff\xd8\xff")  # the first image's bytes, forged in place
    end = data.index(b"\xff\xd9", start) + 2
    data[start:end] = forged_jpeg(bytes(data[start:end]))
    shard.write_bytes(bytes(data))
    reader = loadbench.open_store(tmp_path / "s").raw("train")
    with pytest.raises(LoadbenchError, match=r"damaged.*(65000x65000|4,225,000,000 pixels)"):
        reader.read_batch(np.arange(reader.count))


@pytest.mark.parametrize("peer", ["hf-datasets", "torchvision-imagefolder"])
def test_a_peer_training_on_images_over_the_limit_names_the_store(tmp_path, monkeypatch, peer):
    """The peers' own decoding (datasets' Image feature, torchvision's loader: Pillow) on images
    over the pixel limit: a LoadbenchError, not Pillow's DecompressionBombError."""
    from loadbench.formats import get_format

    if get_format(peer).missing() is not None:
        pytest.skip(f"{peer} is not installed")
    store = loadbench.convert(SMALL, peer, tmp_path / "s")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # every 16x16 image is over twice that
    with pytest.raises(LoadbenchError, match="pixels, over the limit of 32"):
        store.raw("train").samples([0, 1])
