"""Every format x dtype gives back what went in, through every way of reading it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loadbench
from conftest import fork_marks, psnr, valid_combinations
from loadbench.formats import FORMAT_NAMES, MODULES, get_format, to_stored
from loadbench.verify import verify_store

LOSSLESS = [p for p in valid_combinations() if p.values[0] != "files-jpeg"]


def test_the_registry_lists_every_format_of_the_study():
    """The study's formats are all there; a format added later is one module and its line in
    `MODULES` (this test does not change: the registry-driven tests below pick it up)."""
    study = {
        "files-jpeg", "files-png", "npy", "hdf5", "zarr", "lmdb",
        "webdataset", "tfrecord", "tensor",
    }  # fmt: skip
    assert study <= set(FORMAT_NAMES)
    for name in FORMAT_NAMES:
        assert get_format(name).name == name
        assert type(get_format(name)).__module__ in MODULES


@pytest.mark.parametrize("name,dtype", valid_combinations())
def test_round_trip_every_split(stores, rgb_source, name, dtype):
    store = stores[name, dtype]
    assert store.classes == rgb_source.classes
    assert store.splits == ["train", "test"]
    for split in store.splits:
        images, labels = rgb_source.split(split)
        got, got_labels = store.raw(split).read_batch(np.arange(len(labels)))
        assert got.dtype == np.dtype(dtype)
        assert got.shape == images.shape
        np.testing.assert_array_equal(got_labels, labels)
        if name == "files-jpeg":
            assert psnr(got, images) > 30
        else:
            np.testing.assert_array_equal(got, to_stored(images, dtype))


@pytest.mark.parametrize("name,dtype", valid_combinations())
def test_batches_and_items_agree_as_float_tensors(stores, name, dtype):
    store = stores[name, dtype]
    raw, raw_labels = store.raw("train").read_batch(np.arange(len(store.raw("train"))))
    order = [7, 3, 3, 0, -1, 39]
    images, labels = store.read_batch("train", order)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (6, 3, 12, 12)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    expected = torch.from_numpy(raw[order].astype(np.float32)).permute(0, 3, 1, 2)
    if dtype == "uint8":
        expected = expected / 255
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert labels.tolist() == raw_labels[order].tolist()
    dataset = store.dataset("train")
    assert len(dataset) == 40
    for k, index in enumerate(order):
        image, label = dataset[index]
        torch.testing.assert_close(image, images[k], rtol=0, atol=1e-6)
        assert label == labels[k]


@pytest.mark.parametrize(
    "name,dtype",
    [pytest.param(*p.values, id=p.id, marks=[*p.marks, *fork_marks(p.values[0])])
     for p in valid_combinations()],
)  # fmt: skip
def test_dataloader_with_two_workers_after_the_parent_read(stores, name, dtype):
    store = stores[name, dtype]
    dataset = store.dataset("test")
    first = dataset[0][0]  # handles opened in the parent must not leak into the workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    expected, expected_labels = store.read_batch("test", np.arange(12))
    torch.testing.assert_close(images, expected.cpu(), rtol=0, atol=0)
    assert labels.tolist() == expected_labels.tolist()
    torch.testing.assert_close(images[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("name,dtype", valid_combinations())
def test_datasets_pickle_without_open_handles(stores, name, dtype):
    dataset = stores[name, dtype].dataset("train")
    before = dataset[5]
    clone = pickle.loads(pickle.dumps(dataset))
    after = clone[5]
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert after[1] == before[1]


def test_out_of_range_index_is_an_index_error(stores):
    store = stores["npy", "uint8"]
    with pytest.raises(IndexError):
        store.dataset("train")[40]
    with pytest.raises(IndexError):
        store.read_batch("train", [0, 40])


def test_unknown_split_names_the_ones_there(stores):
    with pytest.raises(loadbench.LoadbenchError, match="has no split 'val'; it has train, test"):
        stores["npy", "uint8"].dataset("val")


@pytest.mark.parametrize("name", ["files-jpeg", "files-png"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_files_formats_refuse_float_dtypes(tmp_path, rgb_source, name, dtype):
    with pytest.raises(loadbench.LoadbenchError, match=rf"{name} stores uint8 images only"):
        loadbench.convert(rgb_source, name, tmp_path / "s", dtype)
    assert not (tmp_path / "s").exists()


def test_unknown_format_dtype_and_option_are_clear_errors(tmp_path, rgb_source):
    with pytest.raises(loadbench.LoadbenchError, match="unknown format 'parquet'"):
        loadbench.convert(rgb_source, "parquet", tmp_path / "a")
    with pytest.raises(loadbench.LoadbenchError, match="unknown dtype 'int16'"):
        loadbench.convert(rgb_source, "npy", tmp_path / "b", "int16")
    with pytest.raises(loadbench.LoadbenchError, match="npy has no option compression"):
        loadbench.convert(rgb_source, "npy", tmp_path / "c", compression="gzip")
    with pytest.raises(loadbench.LoadbenchError, match="compression='brotli' is not one of"):
        loadbench.convert(rgb_source, "zarr", tmp_path / "d", compression="brotli")
    with pytest.raises(loadbench.LoadbenchError, match="encoding=png stores uint8 images only"):
        loadbench.convert(rgb_source, "webdataset", tmp_path / "e", "float16", encoding="png")


VARIANTS = [
    ("hdf5", {"chunk_images": 7, "compression": "gzip", "compression_level": 6}),
    ("hdf5", {"compression": "lzf"}),
    ("hdf5", {"chunk_images": 1}),
    ("zarr", {"chunk_images": 5, "compression": "blosc-zstd"}),
    ("zarr", {"compression": "blosc-lz4", "store": "zip"}),
    ("zarr", {"chunk_images": 64, "compression": "zstd"}),
    ("zarr", {"chunk_images": 3, "compression": "gzip", "store": "zip"}),
    ("webdataset", {"shard_size": 7, "encoding": "png"}),
    ("webdataset", {"shard_size": 100, "encoding": "jpeg", "jpeg_quality": 95}),
    ("tfrecord", {"shard_size": 9}),
    ("tfrecord", {"encoding": "png", "shard_size": 16}),
    ("files-png", {"png_compression": 9}),
    ("files-jpeg", {"jpeg_quality": 75, "jpeg_subsampling": "4:2:0"}),
]


@pytest.mark.parametrize(
    "name,options", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)]
)
def test_format_options_round_trip(tmp_path, rgb_source, name, options):
    store = loadbench.convert(rgb_source, name, tmp_path / "s", "uint8", **options)
    for key, value in options.items():
        assert store.manifest.options[key] == value
    images, labels = rgb_source.split("train")
    order = np.random.default_rng(0).permutation(len(labels))
    got, got_labels = store.raw("train").read_batch(order)
    np.testing.assert_array_equal(got_labels, labels[order])
    checks = verify_store(store, rgb_source, psnr_threshold_db=20)
    assert [c.problems for c in checks] == [[], []]
    if store.manifest.lossy:
        assert 20 < psnr(got, images[order]) < 60
        assert checks[0].psnr_db == pytest.approx(psnr(got, images[order]), abs=0.01)
    else:
        np.testing.assert_array_equal(got, images[order])
        assert checks[0].exact_images == 40


def test_sharded_formats_really_write_several_shards(tmp_path, rgb_source):
    wds = loadbench.convert(rgb_source, "webdataset", tmp_path / "w", shard_size=7)
    tfr = loadbench.convert(rgb_source, "tfrecord", tmp_path / "t", shard_size=9)
    assert len(wds.manifest.splits["train"].model_extra["shards"]) == 6  # 40 images / 7
    assert tfr.manifest.splits["train"].model_extra["shards"] == [
        f"train-{i:05d}-of-00005.tfrecord" for i in range(5)
    ]


def test_zarr_zip_store_is_one_file(tmp_path, rgb_source):
    store = loadbench.convert(rgb_source, "zarr", tmp_path / "z", store="zip")
    assert sorted(store.manifest.files) == ["data.zarr.zip"]


def test_chunked_stores_record_their_chunking(tmp_path, rgb_source):
    h5 = loadbench.convert(rgb_source, "hdf5", tmp_path / "h", compression="gzip")
    z = loadbench.convert(rgb_source, "zarr", tmp_path / "z", chunk_images=6)
    assert h5.manifest.splits["train"].model_extra["chunk_images"] >= 1
    assert z.manifest.splits["train"].model_extra["chunk_images"] == 6


# -- the stores are readable by the libraries users already have ------------------------------


def test_files_store_is_an_imagefolder_with_the_same_classes(stores, rgb_source):
    from torchvision.datasets import ImageFolder

    store = stores["files-png", "uint8"]
    folder = ImageFolder(f"{store.path}/train")
    assert len(folder) == 40
    images, labels = rgb_source.split("train")
    by_name = {p.rsplit("/", 1)[1]: t for p, t in folder.samples}
    for index in range(40):
        assert by_name[f"{index:07d}.png"] == labels[index]
        assert folder.classes[labels[index]].endswith(rgb_source.classes[labels[index]])


def test_hdf5_and_zarr_stores_are_plain_arrays(stores, rgb_source):
    import h5py
    import zarr

    images, labels = rgb_source.split("test")
    with h5py.File(f"{stores['hdf5', 'uint8'].path}/data.h5", "r") as f:
        np.testing.assert_array_equal(f["/test/images"][()], images)
        np.testing.assert_array_equal(f["/test/labels"][()], labels)
    group = zarr.open_group(f"{stores['zarr', 'float32'].path}/data.zarr", mode="r")
    np.testing.assert_array_equal(group["test/images"][:], to_stored(images, "float32"))


def test_webdataset_library_streams_the_shards(stores, rgb_source):
    import webdataset as wds

    store = stores["webdataset", "uint8"]
    shards = [
        f"{store.path}/{name}" for name in store.manifest.splits["test"].model_extra["shards"]
    ]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode().to_tuple("npy", "cls"))
    images, labels = rgb_source.split("test")
    assert [int(c) for _, c in samples] == labels.tolist()
    np.testing.assert_array_equal(np.stack([x for x, _ in samples]), images)


def test_tfrecord_package_reads_the_records(stores, rgb_source):
    from tfrecord.reader import tfrecord_loader

    store = stores["tfrecord", "float16"]
    name = store.manifest.splits["train"].model_extra["shards"][0]
    path = f"{store.path}/{name}"
    wanted = {"image/encoded": "byte", "image/class/label": "int"}
    # Two shards of the file through the package's index: our offsets must be right.
    records = [
        r
        for part in (0, 1)
        for r in tfrecord_loader(path, path + ".index", wanted, shard=(part, 2))
    ]
    images, labels = rgb_source.split("train")
    assert [int(r["image/class/label"][0]) for r in records] == labels.tolist()
    decoded = np.stack(
        [np.frombuffer(r["image/encoded"], np.float16).reshape(12, 12, 3) for r in records]
    )
    np.testing.assert_array_equal(decoded, to_stored(images, "float16"))


def test_tensor_format_loads_onto_the_chosen_device(stores):
    store = loadbench.open_store(stores["tensor", "uint8"].path, device="cpu")
    images, labels = store.read_batch("train", [0, 1])
    assert images.device.type == "cpu" and labels.device.type == "cpu"
    assert images.dtype == torch.float32
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled, shuffled_labels = store.read_batch("train", permutation)  # indexed in place
    expected, expected_labels = stores["npy", "uint8"].read_batch("train", permutation.numpy())
    torch.testing.assert_close(shuffled, expected, rtol=0, atol=0)
    assert shuffled_labels.tolist() == expected_labels.tolist()
    with pytest.raises(IndexError, match="index 40 out of range"):
        store.read_batch("train", [3, 40])


# -- shapes: grayscale, RGB, odd sizes, tiny counts ------------------------------------------------


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    c=st.sampled_from([1, 3]),
    n=st.integers(1, 9),
    name=st.sampled_from([n for n in FORMAT_NAMES if n != "files-jpeg"]),
    dtype=st.sampled_from(["uint8", "float16", "float32"]),
    data=st.data(),
)
def test_round_trip_any_shape(tmp_path_factory, h, w, c, n, name, dtype, data):
    if dtype not in get_format(name).dtypes:
        dtype = "uint8"
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    source = loadbench.from_arrays({"train": (images, labels)}, classes=["x", "y", "z"])
    store = loadbench.convert(source, name, tmp_path_factory.mktemp("hyp") / "s", dtype)
    got, got_labels = store.raw("train").read_batch(np.arange(n)[::-1])
    np.testing.assert_array_equal(got, to_stored(images[::-1], dtype))
    np.testing.assert_array_equal(got_labels, labels[::-1])
    store.close()


def test_grayscale_round_trip_in_every_format(tmp_path, gray_source):
    images, labels = gray_source.split("train")
    for name in FORMAT_NAMES:
        store = loadbench.convert(gray_source, name, tmp_path / name)
        got, got_labels = store.raw("train").read_batch(np.arange(9))
        assert got.shape == (9, 7, 5, 1)
        if name == "files-jpeg":
            assert psnr(got, images) > 30
        else:
            np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(got_labels, labels)
        tensor, _ = store.read_batch("test", [0])
        assert tensor.shape == (1, 1, 7, 5)


@pytest.mark.parametrize("name,dtype", valid_combinations())
def test_labels_come_back_without_reading_images(stores, rgb_source, name, dtype):
    for split in ("train", "test"):
        labels = stores[name, dtype].raw(split).labels()
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, rgb_source.labels(split))
