"""Peer loaders give back the source, cover every sample once per epoch, train, and say
clearly when their library is missing."""

from __future__ import annotations

import gc
import importlib.util
import pickle
import socket
import time

import numpy as np
import pytest
import torch
import yaml

import loadbench
from conftest import psnr
from loadbench.bench.experiment import Experiment
from loadbench.bench.matrix import expand
from loadbench.errors import LoadbenchError
from loadbench.formats import PEER_NAMES, get_format
from loadbench.sources.selection import stratified_sample
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches
from loadbench.training.config import TrainConfig
from loadbench.training.order import EpochOrder
from loadbench.training.train import train
from loadbench.verify import verify_store

# A peer that needs a system package (FFmpeg's libraries for spdl-files) is skipped where it is
# missing, with its note; one whose Python library is missing is a failure: the test extra
# installs every one.
MISSING = {name: get_format(name).missing() for name in PEER_NAMES}
HERE = [name for name in PEER_NAMES if MISSING[name] is None]
# Every peer with its default options, plus the other encodings they offer.
VARIANTS = [(name, {}) for name in HERE] + [
    (name, options) for name, options in [
        ("torchvision-imagefolder", {"encoding": "jpeg"}),
        ("webdataset-lib", {"encoding": "png", "shard_size": 7}),
        ("hf-datasets", {"encoding": "array"}),
        ("dali-files", {"encoding": "png"}),
        ("spdl-files", {"encoding": "png"}),
        ("mds", {"encoding": "png", "shard_mb": 0.002}),
    ] if name in HERE
]  # fmt: skip
IDS = [name + "".join(f"-{v}" for v in options.values()) for name, options in VARIANTS]
# Peers that draw loadbench's exact epoch order; the rest stream in their library's own.
MAP_STYLE = {name for name in HERE if not get_format(name).own_order}
STREAMING = sorted(set(HERE) - MAP_STYLE)
BATCH = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory, rgb_source):
    """One store per variant (and loadbench's npy for comparison), converted once."""
    root = tmp_path_factory.mktemp("peers")
    made = {"npy": loadbench.convert(rgb_source, "npy", root / "npy")}
    for ident, (name, options) in zip(IDS, VARIANTS, strict=True):
        made[ident] = loadbench.convert(rgb_source, name, root / ident, **options)
    return made


def batches(store, order, workers, split="train", augmenter=None, access="sample"):
    return make_batches(
        store, split, order, access=access, batch_size=BATCH, workers=workers,
        pin_memory=False, device="cpu", augmenter=augmenter,
    )  # fmt: skip


def epoch_indices(store, loader, split="train") -> tuple[list[int], list[int]]:
    """Store indices of the images one pass yields (matched by pixels), and the batch sizes."""
    stored, stored_labels = store.raw(split).read_batch(np.arange(store.counts[split]))
    lookup = {image.tobytes(): i for i, image in enumerate(stored)}
    assert len(lookup) == len(stored)  # random images: each one is unique
    indices, sizes = [], []
    for images, labels in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (3, 12, 12) and len(images) == len(labels)
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        found = [lookup[p.tobytes()] for p in pixels]
        assert labels.tolist() == stored_labels[found].tolist()
        indices += found
        sizes.append(len(labels))
    return indices, sizes


def test_every_peer_is_registered_as_a_sample_only_uint8_peer():
    for name in PEER_NAMES:
        fmt = get_format(name)
        assert fmt.name == name and fmt.peer
        assert fmt.accesses == ("sample",) and fmt.dtypes == ("uint8",)
        # the test extra installs every peer's library; only system packages may be missing
        assert MISSING[name] is None or "apt-get install" in MISSING[name], MISSING[name]
    skipped = {name: note for name, note in MISSING.items() if note}
    if skipped:
        pytest.skip(f"peers not tested here: {skipped}")


@pytest.mark.parametrize("ident", IDS)
def test_reads_give_back_the_source(stores, rgb_source, ident):
    store = stores[ident]
    name, options = VARIANTS[IDS.index(ident)]
    encoding = get_format(name).parse_options(options).get("encoding")
    jpeg = encoding == "jpeg"  # dali-files and spdl-files store JPEG by default
    assert store.manifest.lossy == jpeg
    for split in ("train", "test"):
        images, labels = rgb_source.split(split)
        everything = np.arange(len(labels))
        got, got_labels = store.raw(split).read_batch(everything)
        assert got.dtype == np.uint8 and got.shape == images.shape
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(store.raw(split).labels(), labels)
        if jpeg:
            assert psnr(got, images) > 30
        else:
            np.testing.assert_array_equal(got, images)
            np.testing.assert_array_equal(got, stores["npy"].raw(split).read_batch(everything)[0])
    checks = verify_store(store, rgb_source)
    assert [c.problems for c in checks] == [[], []]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("ident", IDS)
def test_an_epoch_yields_every_sample_once(stores, ident, workers):
    store = stores[ident]
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(40), labels, seed=5)
    loader = batches(store, order, workers)
    assert len(loader) == 3
    seen = []
    for epoch in (1, 2):
        order.set_epoch(epoch)
        indices, sizes = epoch_indices(store, loader)
        assert sorted(indices) == list(range(40))
        assert sizes == [16, 16, 8]  # the last partial batch is kept
        if VARIANTS[IDS.index(ident)][0] in MAP_STYLE:
            assert indices == order.draw()[0].tolist()
        seen.append(indices)
    assert seen[0] != seen[1]  # a new shuffle each epoch


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", HERE)
def test_a_subset_order_yields_only_its_samples(stores, name, workers):
    store = stores[name]
    labels = store.raw("train").labels()
    val = stratified_sample(labels, 0.25, seed=1)
    rest = np.setdiff1d(np.arange(40), val)
    evaluation = EpochOrder(val, labels[val], seed=0, shuffle=False)
    indices, _ = epoch_indices(store, batches(store, evaluation, workers))
    assert sorted(indices) == val.tolist()
    if name in MAP_STYLE or workers == 0:
        assert indices == val.tolist()  # the eval pass in index order
    training = EpochOrder(rest, labels[rest], seed=0)
    training.set_epoch(1)
    loader = batches(store, training, workers)
    indices, sizes = epoch_indices(store, loader)
    assert sorted(indices) == rest.tolist()
    assert len(loader) == len(sizes) and sizes[:-1] == [BATCH] * (len(sizes) - 1)


@pytest.mark.parametrize("name", HERE)
def test_grayscale_images_keep_one_channel(tmp_path, gray_source, name):
    store = loadbench.convert(gray_source, name, tmp_path / "g")
    images, labels = gray_source.split("train")
    got, got_labels = store.raw("train").read_batch(np.arange(9))
    if store.manifest.lossy:  # the loader must give what the store holds: its decode
        assert psnr(got, images) > 30
        images = got
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    order = EpochOrder(np.arange(9), labels, seed=0)
    loaded = torch.cat([x for x, _ in batches(store, order, 0)])
    assert loaded.shape == (9, 1, 7, 5)
    pixels = (loaded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert sorted(p.tobytes() for p in pixels) == sorted(i.tobytes() for i in images)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_webdataset_with_more_workers_than_shards_loses_and_repeats_nothing(tmp_path, rgb_source):
    # train: shards of 30 and 10 images; test: one shard; three workers, so one or two idle.
    store = loadbench.convert(rgb_source, "webdataset-lib", tmp_path / "w", shard_size=30)
    assert len(store.manifest.splits["train"].model_extra["shards"]) == 2
    for split, count in (("train", 40), ("test", 12)):
        order = EpochOrder(np.arange(count), np.zeros(count, dtype=np.int64), seed=0)
        order.set_epoch(1)
        indices, sizes = epoch_indices(store, batches(store, order, 3, split), split)
        assert sorted(indices) == list(range(count))
        assert sizes == [16] * (count // 16) + [count % 16]


@pytest.mark.parametrize("name", sorted(MAP_STYLE))
def test_map_style_peers_give_loadbench_batches_augmentation_included(stores, name):
    store, npy = stores[name], stores["npy"]
    if store.manifest.lossy:  # JPEG by default: its PNG store holds the very pixels of npy
        store = stores[f"{name}-png"]
    labels = npy.raw("train").labels()
    augmenter = Augmenter(build_augment(["crop", "flip"], npy.image_shape), None, seed=3)
    order = EpochOrder(np.arange(40), labels, seed=2, balance="oversample")
    order.set_epoch(4)
    ours = list(batches(npy, order, 0, augmenter=augmenter))
    theirs = list(batches(store, order, 2, augmenter=augmenter))
    assert len(ours) == len(theirs)
    for (a, la), (b, lb) in zip(ours, theirs, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        assert la.tolist() == lb.tolist()


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_peers_augment_every_sample_and_refuse_balancing(stores, name):
    store = stores[name]
    labels = store.raw("train").labels()
    stored = store.raw("train").read_batch(np.arange(40))[0]
    flip = Augmenter(build_augment(["flip"], store.image_shape), None, seed=0)
    order = EpochOrder(np.arange(40), labels, seed=0)
    order.set_epoch(1)
    flipped = 0
    for images, _ in batches(store, order, 0, augmenter=flip):
        for image in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
            mirrored = image[:, ::-1]
            assert any((image == s).all() or (mirrored == s).all() for s in stored)
            flipped += not any((image == s).all() for s in stored)
    assert 0 < flipped < 40
    for balance in ("weighted", "oversample"):
        order = EpochOrder(np.arange(40), labels, seed=0, balance=balance)
        with pytest.raises(LoadbenchError, match=f"cannot draw balance={balance}"):
            batches(store, order, 0)


def test_dropping_a_litdata_loader_stops_its_workers_at_once(stores):
    store = stores["litdata"]
    order = EpochOrder(np.arange(40), store.raw("train").labels(), seed=0)
    loader = batches(store, order, 2)
    assert sum(len(y) for _, y in loader) == 40
    started = time.perf_counter()
    del loader
    gc.collect()
    # Left to the garbage collector, litdata's persistent workers take 5 s each to stop.
    assert time.perf_counter() - started < 4


@pytest.mark.parametrize("name", HERE)
def test_batch_access_is_refused(stores, name):
    order = EpochOrder(np.arange(40), np.zeros(40, dtype=np.int64), seed=0)
    with pytest.raises(LoadbenchError, match="own pipeline with sample access only"):
        batches(stores[name], order, 0, access="batch")


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_peers_refuse_the_block_shuffle_they_would_ignore(stores, name):
    order = EpochOrder(np.arange(40), np.zeros(40, dtype=np.int64), seed=0, shuffle="block")
    with pytest.raises(LoadbenchError, match="own order; use shuffle exact"):
        batches(stores[name], order, 0)


@pytest.mark.parametrize("name", HERE)
def test_datasets_pickle_without_open_handles(stores, name):
    dataset = stores[name].dataset("train")
    before = dataset[5]
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[5][0], before[0], rtol=0, atol=0)
    assert clone[5][1] == before[1]


@pytest.mark.parametrize("name", HERE)
def test_one_training_epoch_end_to_end(stores, tmp_path, name):
    # workers=0: a finished run's DataLoaders are left to the cyclic garbage collector, which
    # stops persistent workers only after torch's 5 s join timeout each (any format).
    config = TrainConfig(
        data=stores[name].path, epochs=1, out=str(tmp_path / "run"), widths="8,16",
        batch_size=BATCH, workers=0,
    )  # fmt: skip
    result = train(config)
    assert [row["epoch"] for row in result.history] == [1]
    assert np.isfinite(result.history[0]["train_loss"])
    assert 0 <= result.history[0]["test_accuracy"] <= 1  # no val split: test, named so
    assert (tmp_path / "run" / "model.pt").is_file()


def test_no_peer_reaches_the_network(tmp_path, rgb_source, monkeypatch):
    connect = socket.socket.connect

    def local_only(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection to {address}")
        return connect(sock, address, *args)  # DataLoader workers use Unix sockets

    monkeypatch.setattr(socket.socket, "connect", local_only)
    for name in HERE:
        store = loadbench.convert(rgb_source, name, tmp_path / name)
        order = EpochOrder(np.arange(12), store.raw("test").labels(), seed=0)
        assert sum(len(y) for _, y in batches(store, order, 0, "test")) == 12


def test_a_missing_library_is_a_clear_note_everywhere(tmp_path, rgb_source, monkeypatch):
    find_spec = importlib.util.find_spec

    def without_datasets(name, *args):
        return None if name == "datasets" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_datasets)
    note = "hf-datasets needs datasets, which is not installed: pip install datasets"
    assert get_format("hf-datasets").missing() == note
    assert get_format("litdata").missing() is None
    with pytest.raises(LoadbenchError, match=note):
        loadbench.convert(rgb_source, "hf-datasets", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    experiment = Experiment(
        datasets=[{"source": "synthetic:cifar-like"}], formats=["npy", "peers"], workers=[0]
    )
    skips = {cell.format: cell.skip for cell in expand(experiment)}
    assert skips == {"npy": None, **MISSING, "hf-datasets": note}


def test_a_store_whose_peer_library_went_missing_says_so(stores, monkeypatch):
    monkeypatch.setattr(type(get_format("litdata")), "requires", ("litdata_not_here",))
    store = loadbench.open_store(stores["litdata"].path)
    with pytest.raises(LoadbenchError, match="needs litdata_not_here, which is not installed"):
        store.dataset("train")


@pytest.mark.parametrize("name", HERE)
def test_loadbench_bench_runs_each_peer_loader_only_and_training(tmp_path, name):
    from loadbench.bench.experiment import load_experiment
    from loadbench.bench.records import read_runs
    from loadbench.bench.runner import run_experiment
    from loadbench.report.data import load_results
    from loadbench.report.tables import dataset_table

    values = {
        "name": "peer", "datasets": [{"source": "synthetic:cifar-like?count=48&eval_count=16"
                                      "&size=12&classes=3", "name": "tiny"}],
        "formats": [name], "epochs": 1, "repeats": 1, "batch_size": 16,
        "ceilings": True, "train": {"widths": "4,8"},  # train, its loader-only twin, compute
    }  # fmt: skip
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(values))
    outcome = run_experiment(load_experiment(tmp_path / "exp.yaml"), tmp_path / "r",
                             tmp_path / "stores")  # fmt: skip
    records = {r["mode"]: r for r in read_runs(tmp_path / "r")}
    assert outcome.failed == 0 and set(records) == {"loader-only", "train", "compute-only"}
    for record in records.values():
        (epoch,) = record["epochs"]
        assert record["status"] == "ok" and epoch["images_per_s"] > 0
        assert record["cpu_budget"] == 1 and record["peer"] is True
    assert np.isfinite(records["train"]["epochs"][0]["train_loss"])
    # The report marks the peer and states its CPU budget beside its img/s.
    table = dataset_table(load_results(str(tmp_path / "r")), "tiny")
    (row,) = table.rows
    own = get_format(name).own_order
    assert row[1] == f"{name}/uint8/sample/w0 (peer{', own order' if own else ''})"
    assert records["train"]["epoch_order"] == ("own" if own else "exact")
    rate, cores, per_core = (row[table.columns.index(c)] for c in ("img/s", "cores", "img/s/core"))
    assert cores == "1" and per_core == rate
    assert any("(peer) are other projects' loaders" in note for note in table.notes)
