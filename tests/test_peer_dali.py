"""The DALI peers (`dali-files`, `dali-npy`, `dali-tfrecord`, `dali-webdataset`) beyond what
tests/test_peers.py checks of every peer: their other encodings, the index files DALI reads,
loadbench's order for `dali-npy`, augmentation keyed by store index, and no threads left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import loadbench
from loadbench.errors import LoadbenchError
from loadbench.formats.pixels import to_tensor
from loadbench.sources.selection import stratified_sample
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder

pytest.importorskip("nvidia.dali")

BATCH = 16
# The encodings test_peers.py does not convert (it takes each peer's default).
VARIANTS = {
    "files-png": ("dali-files", {"encoding": "png"}),
    "tfrecord-png": ("dali-tfrecord", {"encoding": "png", "shard_size": 15}),
    "tfrecord-jpeg": ("dali-tfrecord", {"encoding": "jpeg"}),
    "webdataset-png": ("dali-webdataset", {"encoding": "png", "shard_size": 7}),
    "webdataset-jpeg": ("dali-webdataset", {"encoding": "jpeg"}),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, rgb_source):
    root = tmp_path_factory.mktemp("dali")
    made = {"npy": loadbench.convert(rgb_source, "npy", root / "npy")}
    made["dali-npy"] = loadbench.convert(rgb_source, "dali-npy", root / "dali-npy")
    made["dali-webdataset"] = loadbench.convert(rgb_source, "dali-webdataset", root / "wds")
    for ident, (name, options) in VARIANTS.items():
        made[ident] = loadbench.convert(rgb_source, name, root / ident, **options)
    return made


def batches(store, order, workers=0, augmenter=None, split="train"):
    return make_batches(
        store, split, order, access="sample", batch_size=BATCH, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pass_indices(store, loader, split="train"):
    """Store indices of the images one pass yields (matched by pixels against loadbench's own
    reads of the store), checking labels and batch sizes on the way."""
    stored, labels = store.raw(split).read_batch(np.arange(store.counts[split]))
    lookup = {image.tobytes(): i for i, image in enumerate(stored)}
    indices, sizes = [], []
    for images, got in loader:
        assert images.dtype == torch.float32 and got.dtype == torch.int64
        found = [lookup[p.tobytes()] for p in as_uint8(images)]
        assert got.tolist() == labels[found].tolist()
        indices += found
        sizes.append(len(got))
    return indices, sizes


@pytest.mark.parametrize("ident", sorted(VARIANTS))
def test_other_encodings_read_every_sample_once_and_subsets_only_theirs(stores, ident):
    store = stores[ident]
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(40), labels, seed=3)
    order.set_epoch(2)
    indices, sizes = pass_indices(store, batches(store, order, workers=2))
    assert sorted(indices) == list(range(40)) and sizes == [16, 16, 8]
    val = stratified_sample(labels, 0.25, seed=1)
    evaluation = EpochOrder(val, labels[val], seed=0, shuffle=False)
    assert pass_indices(store, batches(store, evaluation))[0] == val.tolist()


def test_dali_npy_gives_loadbench_batches_in_its_order_augmentation_and_balance_included(
    stores,
):
    npy, dali = stores["npy"], stores["dali-npy"]
    labels = npy.raw("train").labels()
    augmenter = Augmenter(build_augment(["crop", "flip"], npy.image_shape), None, seed=3)
    order = EpochOrder(np.arange(40), labels, seed=2, balance="oversample")
    order.set_epoch(4)
    ours = list(batches(npy, order, augmenter=augmenter))
    for workers in (0, 2):
        theirs = list(batches(dali, order, workers, augmenter=augmenter))
        assert [len(y) for _, y in theirs] == [len(y) for _, y in ours]
        for (a, la), (b, lb) in zip(ours, theirs, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            assert la.tolist() == lb.tolist()


@pytest.mark.parametrize("ident", ["files-png", "tfrecord-png", "webdataset-png"])
def test_reader_peers_augment_each_image_keyed_by_its_store_index(stores, ident):
    store = stores[ident]
    stored, labels = store.raw("train").read_batch(np.arange(40))
    augmenter = Augmenter(build_augment(["crop", "flip"], store.image_shape), None, seed=5)
    expected = as_uint8(augmenter.batch(to_tensor(stored), np.arange(40), np.zeros(40, bool), 3))
    by_pixels = {image.tobytes(): i for i, image in enumerate(expected)}
    order = EpochOrder(np.arange(40), labels, seed=0)
    order.set_epoch(3)
    found = []
    for images, got in batches(store, order, augmenter=augmenter):
        keys = [by_pixels[image.tobytes()] for image in as_uint8(images)]
        assert got.tolist() == labels[keys].tolist()
        found += keys
    assert sorted(found) == list(range(40))


@pytest.mark.parametrize("ident", ["files-png", "tfrecord-jpeg", "dali-webdataset"])
def test_reader_peers_repeat_an_epoch_and_refuse_what_they_cannot_draw(stores, ident):
    store = stores[ident]
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(40), labels, seed=4)
    order.set_epoch(1)
    loader = batches(store, order)
    first, again = pass_indices(store, loader)[0], pass_indices(store, loader)[0]
    assert first == again  # (seed, epoch) decides an epoch's order, whatever ran before
    with pytest.raises(LoadbenchError, match="own order; use shuffle exact"):
        batches(store, EpochOrder(np.arange(40), labels, seed=0, shuffle="block"))


def test_grayscale_png_files_keep_one_channel(tmp_path, gray_source):
    store = loadbench.convert(gray_source, "dali-files", tmp_path / "g", encoding="png")
    images, labels = gray_source.split("train")
    order = EpochOrder(np.arange(9), labels, seed=0)
    loaded = torch.cat([x for x, _ in batches(store, order)])
    assert loaded.shape == (9, 1, 7, 5)
    assert sorted(p.tobytes() for p in as_uint8(loaded)) == sorted(i.tobytes() for i in images)


def test_grayscale_jpeg_files_decode_as_loadbench_decodes_them(tmp_path, gray_source):
    store = loadbench.convert(gray_source, "dali-files", tmp_path / "g")
    assert store.manifest.lossy
    stored = store.raw("train").read_batch(np.arange(9))[0]
    order = EpochOrder(np.arange(9), gray_source.split("train")[1], seed=0)
    loaded = torch.cat([x for x, _ in batches(store, order)])
    assert sorted(p.tobytes() for p in as_uint8(loaded)) == sorted(i.tobytes() for i in stored)


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("ident", ["files-png", "dali-npy", "tfrecord-png", "dali-webdataset"])
def test_close_stops_the_pipeline_threads_even_after_a_pass_cut_short(stores, ident):
    store = stores[ident]
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    warm = batches(store, order, workers=2)
    list(warm)  # DALI starts its lasting threads (once per process) on first use
    warm.close()
    before = _tasks()
    loader = batches(store, order, workers=2)
    passing = iter(loader)
    next(passing)
    assert _tasks() >= before + 2  # the pipeline's 2 threads (and DALI's own) are running
    loader.close()
    assert _tasks() <= before
    next(iter(loader))  # the training loop's first-batch checks: a pass dropped at once
    assert _tasks() <= before
    del passing


def test_tfrecord_index_files_are_what_dalis_tfrecord2idx_writes(stores, tmp_path):
    store = stores["tfrecord-png"]
    root = Path(store.path)
    shards = store.manifest.splits["train"].model_extra["shards"]
    assert len(shards) == 3
    script = shutil.which("tfrecord2idx", path=os.path.dirname(sys.executable))
    assert script is not None
    for shard in shards:
        made = tmp_path / (shard + ".idx")
        # tfrecord2idx tries TensorFlow's file API first: hidden, it reads with open().
        code = (
            "import runpy, sys; sys.modules['tensorflow'] = None; "
            f"sys.argv = ['tfrecord2idx', {str(root / shard)!r}, {str(made)!r}]; "
            f"runpy.run_path({script!r}, run_name='__main__')"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert made.read_text() == (root / (shard + ".index")).read_text()


def test_webdataset_shards_carry_dalis_index_so_no_tar_is_scanned(stores, capfd):
    store = stores["webdataset-png"]
    for split in ("train", "test"):
        for shard in store.manifest.splits[split].model_extra["shards"]:
            index = shard.removesuffix(".tar") + ".idx"
            assert index in store.manifest.files
            assert (Path(store.path) / index).read_text().startswith("v1.2 ")
    order = EpochOrder(np.arange(12), store.raw("test").labels(), seed=0)
    assert sum(len(y) for _, y in batches(store, order, split="test")) == 12
    assert "Index file not provided" not in capfd.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ident", ["dali-npy", "tfrecord-jpeg", "webdataset-png"])
def test_with_cuda_images_are_decoded_and_normalised_on_the_gpu(stores, ident):
    store = stores[ident]
    stored, labels = store.raw("train").read_batch(np.arange(40))
    order = EpochOrder(np.arange(40), labels, seed=0)
    seen = 0
    for images, got in batches(store, order, workers=2):
        assert images.is_cuda and images.dtype == torch.float32
        assert images.shape[1:] == (3, 12, 12)
        seen += len(got)
    assert seen == 40
    # nvJPEG may round differently from libjpeg-turbo; PNG and raw pixels are exact.
    evaluation = EpochOrder(np.arange(40), labels, seed=0, shuffle=False)
    loaded = as_uint8(torch.cat([x for x, _ in batches(store, evaluation)]))
    tolerance = 4 if "jpeg" in ident else 0
    assert np.abs(loaded.astype(int) - stored.astype(int)).max() <= tolerance


def test_without_any_nvidia_package_the_note_says_what_to_install(monkeypatch):
    import importlib.util

    from loadbench.formats import get_format

    def no_nvidia(name, *args):
        if name.split(".")[0] == "nvidia":
            raise ModuleNotFoundError("No module named 'nvidia'")  # find_spec of a submodule
        return None

    monkeypatch.setattr(importlib.util, "find_spec", no_nvidia)
    for name in ("dali-files", "dali-npy", "dali-tfrecord", "dali-webdataset"):
        note = f"{name} needs nvidia.dali, which is not installed: pip install nvidia-dali-cuda130"
        assert get_format(name).missing() == note
