"""The fast read paths give what the plain ones give: `read_batch` with its reused buffers and
`out=`, batches decoded straight into arrays, the float conversion, and the TurboJPEG and libpng
decoders (bit for bit the pixels of torchvision's op and Pillow, and the same errors)."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
import torch

import loadbench
from loadbench.formats import codecs, libpng, pixels, turbojpeg
from loadbench.formats.pixels import to_tensor


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    source = loadbench.load_source("synthetic:cifar-like?count=50&eval_count=4&size=12")
    root = tmp_path_factory.mktemp("read-batch")
    return {name: loadbench.convert(source, name, root / name)
            for name in ("npy", "files-jpeg", "files-png", "tensor")}  # fmt: skip


def _per_item(store, indices):
    reader = store.new_reader("train")
    images = np.stack([reader.read(int(i))[0] for i in indices])
    return to_tensor(images), [reader.read(int(i))[1] for i in indices]


@pytest.mark.parametrize("name", ["npy", "files-jpeg", "files-png", "tensor"])
def test_read_batch_returns_batches_of_their_own_unless_given_out(made, name):
    store = made[name]
    first_indices, second_indices = [7, 3, 3, 49, 0], [1, 2, 4, 5, 6]
    first, first_labels = store.read_batch("train", first_indices)
    kept = first.clone()
    second, _ = store.read_batch("train", second_indices)  # the same reused gather buffer
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # not overwritten
    expected, expected_labels = _per_item(store, first_indices)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    assert first_labels.tolist() == expected_labels and first_labels.dtype == torch.int64
    torch.testing.assert_close(second, _per_item(store, second_indices)[0], rtol=0, atol=0)

    out = torch.empty_like(first)
    images, _ = store.read_batch("train", first_indices, out=out)
    assert images is out or images.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    store.read_batch("train", second_indices)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # out is the caller's alone
    with pytest.raises(ValueError, match="out must be"):
        store.raw("train").read_batch_tensor(first_indices, out=torch.empty(2, 3, 12, 12))


def test_to_tensor_divides_every_pixel_value_as_torch_does():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    expected = torch.div(torch.from_numpy(values).permute(0, 3, 1, 2), 255)
    got = to_tensor(values)
    assert got.is_contiguous() and torch.equal(got, expected)
    assert torch.equal(to_tensor(values[0]), expected[0])
    half = values.astype(np.float16) / np.float16(255)
    assert torch.equal(to_tensor(half), torch.from_numpy(half).permute(0, 3, 1, 2).float())
    readonly = values.copy()
    readonly.flags.writeable = False  # as a memory map hands them out
    assert torch.equal(to_tensor(readonly), expected)
    batch = np.random.default_rng(0).integers(0, 256, (7, 160, 160, 3), dtype=np.uint8)
    assert batch.size >= pixels.PARALLEL_ELEMENTS  # converted in parts, each in its place
    assert torch.equal(to_tensor(batch, threads=3), to_tensor(batch))


def _images(channels: int) -> list[np.ndarray]:
    source = loadbench.load_source("synthetic:cifar-like?count=6&eval_count=1&size=24")
    images, _ = source.split("train")
    return [image[:, :, :1] if channels == 1 else image for image in images]


@pytest.mark.skipif(not turbojpeg.available(), reason="no TurboJPEG library on this system")
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:0"])
@pytest.mark.parametrize("channels", [3, 1])
def test_turbojpeg_decodes_torchvisions_pixels(monkeypatch, channels, subsampling):
    options = {"jpeg_quality": 90, "jpeg_subsampling": subsampling}
    for image in _images(channels):
        data = codecs.encode(image, "jpeg", options)
        fast = np.empty(image.shape, np.uint8)
        assert turbojpeg.decode_into(data, fast)
        codecs.decode_into(bytearray(data), out := np.empty_like(fast))  # a bytearray too
        monkeypatch.setattr(turbojpeg, "available", lambda: False)
        reference = codecs.decode(data, channels, image.shape[:2])  # torchvision's op
        monkeypatch.undo()
        np.testing.assert_array_equal(fast, reference)
        np.testing.assert_array_equal(out, reference)
        # a gray JPEG read as RGB, and an RGB one read as gray: the op's conversions
        other = np.empty((*image.shape[:2], 4 - channels), np.uint8)
        codecs.decode_into(data, other)
        monkeypatch.setattr(turbojpeg, "available", lambda: False)
        np.testing.assert_array_equal(other, codecs.decode(data, 4 - channels))
        monkeypatch.undo()


def _png_with_gamma(data: bytes) -> bytes:
    """`data` with a gAMA chunk after IHDR: libpng would convert its pixels, Pillow not."""
    body = b"gAMA" + struct.pack(">I", 100000)
    chunk = struct.pack(">I", 4) + body + struct.pack(">I", zlib.crc32(body))
    return data[:33] + chunk + data[33:]


@pytest.mark.skipif(not libpng.available(), reason="no libpng 1.6 on this system")
@pytest.mark.parametrize("channels", [3, 1])
def test_libpng_decodes_pillows_pixels_and_leaves_it_the_other_pngs(channels):
    for image in _images(channels):
        data = codecs.encode(image, "png", {"png_compression": 6})
        assert libpng.plain(data, channels)
        fast = np.empty(image.shape, np.uint8)
        assert libpng.decode_into(data, fast)
        np.testing.assert_array_equal(fast, image)
        np.testing.assert_array_equal(fast, codecs.decode_pil(data, channels))
        gamma = _png_with_gamma(data)
        assert not libpng.plain(gamma, channels) and not libpng.decode_into(gamma, fast)
        codecs.decode_into(gamma, fast)  # Pillow's, as before
        np.testing.assert_array_equal(fast, codecs.decode_pil(gamma, channels))
        other = np.empty((*image.shape[:2], 4 - channels), np.uint8)  # a conversion: Pillow's
        assert not libpng.decode_into(data, other)
        codecs.decode_into(data, other)
        np.testing.assert_array_equal(other, codecs.decode_pil(data, 4 - channels))


@pytest.mark.parametrize("codec", ["jpeg", "png"])
def test_broken_or_other_size_images_raise_bad_image_through_every_path(codec):
    image = _images(3)[0]
    data = codecs.encode(image, codec, {"jpeg_quality": 90, "jpeg_subsampling": "4:4:4",
                                        "png_compression": 6})  # fmt: skip
    out = np.empty(image.shape, np.uint8)
    for broken in (data[: len(data) // 2], data[:40], b"\xff\xd8" + bytes(30), b"nothing"):
        with pytest.raises(codecs.BadImage):
            codecs.decode_into(broken, out)
    with pytest.raises(codecs.BadImage, match="expected"):
        codecs.decode_into(data, np.empty((8, 8, 3), np.uint8))
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF  # decoded, or refused: never a crash
    with contextlib.suppress(codecs.BadImage):
        codecs.decode_into(bytes(flipped), out)


def test_pil_reads_what_it_wrote_when_the_fast_decoders_are_off(monkeypatch):
    monkeypatch.setattr(turbojpeg, "available", lambda: False)
    monkeypatch.setattr(libpng, "decode_into", lambda data, out: False)
    image = _images(3)[1]
    for codec in ("png", "jpeg"):
        data = codecs.encode(image, codec, {"jpeg_quality": 95, "jpeg_subsampling": "4:4:4",
                                            "png_compression": 1})  # fmt: skip
        out = np.empty(image.shape, np.uint8)
        codecs.decode_into(data, out)
        from PIL import Image

        np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data))))
