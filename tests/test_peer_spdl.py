"""The SPDL peers (`spdl-files`, `spdl-npy`): loadbench's exact epoch order and augmentation,
FFmpeg's decode kept as a JPEG store's pixels, damaged files named, and pipelines whose threads
stop on close, on an error and on Ctrl-C."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import loadbench
from conftest import psnr
from loadbench.errors import CorruptStoreError
from loadbench.formats import codecs, get_format
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder
from loadbench.verify import verify_store

pytestmark = pytest.mark.skipif(
    get_format("spdl-files").missing() is not None, reason="spdl or FFmpeg is not installed"
)
BATCH = 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory, rgb_source):
    root = tmp_path_factory.mktemp("spdl")
    return {
        "npy": loadbench.convert(rgb_source, "npy", root / "npy"),
        "spdl-npy": loadbench.convert(rgb_source, "spdl-npy", root / "spdl-npy"),
        "spdl-png": loadbench.convert(rgb_source, "spdl-files", root / "png", encoding="png"),
        "spdl-jpeg": loadbench.convert(rgb_source, "spdl-files", root / "jpeg"),
    }


def loader(store, order, workers=2, augmenter=None, split="train"):
    return make_batches(
        store, split, order, access="sample", batch_size=BATCH, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def spdl_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spdl")]


def no_spdl_threads_within(seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while spdl_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not spdl_threads()


@pytest.mark.parametrize("ident", ["spdl-npy", "spdl-png"])
def test_batches_are_loadbench_batches_balance_and_augmentation_included(stores, ident):
    labels = stores["npy"].raw("train").labels()
    augmenter = Augmenter(build_augment(["crop", "flip"], (12, 12, 3)), None, seed=3)
    order = EpochOrder(np.arange(40), labels, seed=2, balance="oversample")
    for epoch in (1, 2):
        order.set_epoch(epoch)
        ours = list(loader(stores["npy"], order, 0, augmenter))
        theirs = list(loader(stores[ident], order, 2, augmenter))
        assert [len(y) for _, y in theirs] == [len(y) for _, y in ours]
        for (a, la), (b, lb) in zip(ours, theirs, strict=True):
            assert b.dtype == torch.float32 and lb.dtype == torch.int64
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            assert la.tolist() == lb.tolist()


def test_a_jpeg_store_keeps_ffmpegs_decode_and_follows_the_epoch_order(stores, rgb_source):
    store = stores["spdl-jpeg"]
    assert store.manifest.lossy
    assert [c.problems for c in verify_store(store, rgb_source)] == [[], []]
    stored, labels = store.raw("train").read_batch(np.arange(40))
    assert psnr(stored, rgb_source.split("train")[0]) > 30
    # FFmpeg's IDCT and YUV->RGB are not libjpeg-turbo's: a few levels apart at 4:4:4.
    reader = store.raw("train")
    files = [Path(store.path, reader.relpath(i, int(labels[i]))) for i in range(40)]
    libjpeg = np.stack([codecs.decode(f.read_bytes(), 3) for f in files])
    assert 0 < np.abs(libjpeg.astype(int) - stored).max() <= 4
    order = EpochOrder(np.arange(40), labels, seed=1)
    order.set_epoch(3)
    images = torch.cat([x for x, _ in loader(store, order)])
    drawn = order.draw()[0]
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, stored[drawn])


def test_grayscale_jpeg_decodes_to_one_channel(tmp_path, gray_source):
    store = loadbench.convert(gray_source, "spdl-files", tmp_path / "g")
    images, _ = gray_source.split("train")
    got = store.raw("train").read_batch(np.arange(9))[0]
    assert got.shape == (9, 7, 5, 1) and psnr(got, images) > 30
    order = EpochOrder(np.arange(9), np.arange(9) % 3, seed=0, shuffle=False)
    loaded = torch.cat([x for x, _ in loader(store, order, 0)])
    assert loaded.shape == (9, 1, 7, 5)


@pytest.mark.parametrize("ident", ["spdl-npy", "spdl-jpeg"])
def test_close_mid_epoch_stops_the_pipeline_threads(stores, ident):
    store = stores[ident]
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    batches = loader(store, order, workers=2)
    epoch = iter(batches)
    next(epoch)
    assert spdl_threads()  # its event loop, source and worker threads
    batches.close()
    assert no_spdl_threads_within(), spdl_threads()
    assert sum(len(y) for _, y in batches) == 40  # a new epoch starts cleanly after close
    assert no_spdl_threads_within(), spdl_threads()


def test_an_error_in_the_training_loop_or_ctrl_c_stops_the_pipeline(stores):
    store = stores["spdl-npy"]
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    with pytest.raises(ZeroDivisionError):
        for _ in loader(store, order):
            1 / 0  # noqa: B018
    assert no_spdl_threads_within(), spdl_threads()
    # A real Ctrl-C, in a process of its own: a SIGINT that reached a test worker between two
    # statements would end the worker, not the test.
    script = CTRL_C.format(src=str(Path(loadbench.__file__).parents[1]), path=store.path)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    seconds, threads = done.stdout.split()[-2:]
    assert float(seconds) < 5 and threads == "0", done.stdout


# Interrupted mid-epoch by SIGINT: prints the seconds the interrupt took and the SPDL threads left.
CTRL_C = """
import os, signal, sys, threading, time
sys.path.insert(0, {src!r})
import numpy as np
import loadbench
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder
store = loadbench.open_store({path!r})
order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
batches = make_batches(store, "train", order, access="sample", batch_size=8, workers=2,
                       pin_memory=False, device="cpu", augmenter=None)
read = batches.read
batches.read = lambda indices: (time.sleep(0.3), read(indices))[1]
threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.monotonic()
try:
    for _ in batches:
        time.sleep(0.3)
except KeyboardInterrupt:
    took = time.monotonic() - started
batches.close()
deadline = time.monotonic() + 3
while any(t.name.startswith("spdl") for t in threading.enumerate()) and time.monotonic() < deadline:
    time.sleep(0.05)
print(took, sum(t.name.startswith("spdl") for t in threading.enumerate()))
"""


def _png_declaring(height: int, width: int) -> bytes:
    """A PNG whose IHDR declares height x width (its pixels are not there)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


@pytest.mark.parametrize(
    "damage", [b"not an image at all", _png_declaring(60_000, 60_000), _png_declaring(12, 12)]
)
def test_a_damaged_file_mid_epoch_names_it_and_stops(tmp_path, rgb_source, damage):
    store = loadbench.convert(rgb_source, "spdl-files", tmp_path / "s", encoding="png")
    reader = store.raw("train")
    labels = reader.labels()
    rel = reader.relpath(17, int(labels[17]))
    (tmp_path / "s" / rel).write_bytes(damage)
    with pytest.raises(CorruptStoreError, match=f"cannot decode {rel}"):
        reader.read_batch([16, 17])
    order = EpochOrder(np.arange(40), labels, seed=0, shuffle=False)
    with pytest.raises(CorruptStoreError, match=f"cannot decode {rel}"):
        for _ in loader(store, order):
            pass
    assert no_spdl_threads_within(), spdl_threads()
    checks = verify_store(store, rgb_source)
    assert checks[0].problems and not checks[1].problems


def test_a_damaged_npy_header_is_a_damaged_store(tmp_path, rgb_source):
    loadbench.convert(rgb_source, "spdl-npy", tmp_path / "n")
    path = tmp_path / "n" / "train_images.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptStoreError, match="train_images.npy"):
        loadbench.open_store(tmp_path / "n").raw("train").read_batch([0])


def test_missing_ffmpeg_libraries_are_a_clear_note(monkeypatch):
    from loadbench.peers import spdl_lib

    monkeypatch.setattr(spdl_lib, "missing_ffmpeg", lambda: ["libavdevice"])
    note = get_format("spdl-files").missing()
    assert "needs FFmpeg's shared libraries" in note and "libavdevice" in note
    assert get_format("spdl-npy").missing() is None  # load_npy needs no FFmpeg
