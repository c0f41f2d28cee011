"""Source kinds against tiny files in each real published layout, checked against torchvision.

Every dataset here is written into tmp_path by `layouts.py` exactly as the published archives lay
it out (CIFAR pickles, IDX files, tiny-imagenet-200/, class-per-folder trees); nothing is
downloaded. Where torchvision has a reader for the layout, loadbench must give the same arrays,
labels, classes and order; bad files must raise LoadbenchError naming the file.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loadbench
from layouts import (
    CIFAR10_CLASSES,
    CIFAR10_TRAIN_BATCHES,
    IDX_FILES,
    TINY_WNIDS,
    TINY_WORDS,
    Evil,
    cifar_pickle,
    corrupt_bytes,
    idx_bytes,
    pil_rgb,
    random_rgb,
    save_image,
    tar_gz,
    write_cifar10,
    write_cifar100,
    write_idx_dataset,
    write_tiny_imagenet,
)
from loadbench import LoadbenchError, load_source

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def assert_same_source(a: loadbench.sources.Source, b: loadbench.sources.Source) -> None:
    assert a.classes == b.classes
    assert a.splits == b.splits
    for split in a.splits:
        images_a, labels_a = a.split(split)
        images_b, labels_b = b.split(split)
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def rows(images: np.ndarray) -> list[bytes]:
    """Each image as bytes: random images are unique, so this identifies them."""
    return [im.tobytes() for im in images]


# =============================================================================================
# CIFAR-10 / CIFAR-100 python version


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-root"
    write_cifar10(root)
    return root


@pytest.fixture
def torchvision_cifar(monkeypatch):
    """torchvision's CIFAR readers with the MD5 checks (of the real files) turned off.

    Only integrity checks are replaced: `_check_integrity` (all batches) and the module's
    `check_integrity` that `_load_meta` calls; the parsing is torchvision's own.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tv_cifar


def expected_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent reading of the written batches: train = data_batch_1..5 in order, HWC."""
    out = {}
    for split, names in (("train", CIFAR10_TRAIN_BATCHES), ("test", ["test_batch"])):
        images, labels = [], []
        for name in names:
            batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
            data = batch[b"data"].reshape(-1, 3, 32, 32)  # 1024 R, 1024 G, 1024 B per row
            images.append(data.transpose(0, 2, 3, 1))
            labels.extend(batch[b"labels"])
        out[split] = (np.concatenate(images), np.array(labels, dtype=np.int64))
    return out


def test_cifar10_folder_parent_and_archive_give_identical_arrays(cifar10_root, tmp_path):
    folder = cifar10_root / "cifar-10-batches-py"
    archive = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    only_archive = tmp_path / "only-archive"
    only_archive.mkdir()
    shutil.copy(archive, only_archive / "cifar-10-python.tar.gz")
    with tarfile.open(archive) as tar:
        assert "cifar-10-batches-py/data_batch_1" in tar.getnames()

    from_folder = load_source(f"cifar10:{folder}")
    assert from_folder.classes == CIFAR10_CLASSES
    assert from_folder.splits == ["train", "test"]
    assert from_folder.count("train") == 20 and from_folder.count("test") == 4
    assert from_folder.image_shape == (32, 32, 3)
    for path in (cifar10_root, archive, only_archive):
        assert_same_source(from_folder, load_source(f"cifar10:{path}"))

    expected = expected_cifar10(folder)
    for split in ("train", "test"):
        images, labels = from_folder.split(split)
        assert images.dtype == np.uint8 and images.shape == (len(labels), 32, 32, 3)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
    # Pixel (0, 0) of image 0: the first R, G and B values of the row (channel planes).
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")[b"data"][0]
    np.testing.assert_array_equal(
        from_folder.split("train")[0][0, 0, 0], [first[0], first[1024], first[2048]]
    )
    # (0, 1) is the second value of each plane: rows are row-major 32x32 planes.
    np.testing.assert_array_equal(
        from_folder.split("train")[0][0, 0, 1], [first[1], first[1025], first[2049]]
    )
    np.testing.assert_array_equal(
        from_folder.split("train")[0][0, 1, 0], [first[32], first[1056], first[2080]]
    )


def test_cifar10_matches_torchvision(cifar10_root, torchvision_cifar):
    source = load_source(f"cifar10:{cifar10_root}")
    for split, train in (("train", True), ("test", False)):
        tv = torchvision_cifar.CIFAR10(str(cifar10_root), train=train, download=False)
        images, labels = source.split(split)
        assert images.shape == tv.data.shape
        np.testing.assert_array_equal(images, tv.data)
        np.testing.assert_array_equal(labels, np.array(tv.targets, dtype=np.int64))
        assert source.classes == tv.classes


def test_cifar10_pickles_written_by_python3_read_the_same(tmp_path):
    """`pickle.dumps(batch, protocol=2)` today: bytes via _codecs.encode, numpy._core names."""
    write_cifar10(tmp_path / "py2", style="py2")
    write_cifar10(tmp_path / "py3", style="py3")
    assert (
        b"numpy.core.multiarray" in (tmp_path / "py2/cifar-10-batches-py/test_batch").read_bytes()
    )
    assert b"_codecs" in (tmp_path / "py3/cifar-10-batches-py/test_batch").read_bytes()
    assert_same_source(
        load_source(f"cifar10:{tmp_path / 'py2'}"), load_source(f"cifar10:{tmp_path / 'py3'}")
    )


def test_cifar100_fine_matches_torchvision_and_coarse_option(tmp_path, torchvision_cifar):
    root = tmp_path / "c100"
    folder = write_cifar100(root)
    fine = load_source(f"cifar100:{root}")
    assert len(fine.classes) == 100 and fine.classes[7] == "fine_07"
    for split, train in (("train", True), ("test", False)):
        tv = torchvision_cifar.CIFAR100(str(root), train=train, download=False)
        images, labels = fine.split(split)
        np.testing.assert_array_equal(images, tv.data)
        np.testing.assert_array_equal(labels, tv.targets)
        assert fine.classes == tv.classes

    coarse = load_source(f"cifar100:{folder}", labels="coarse")
    assert coarse.classes == [f"coarse_{i:02d}" for i in range(20)]
    assert coarse.count("train") == 8 and coarse.count("test") == 4
    for split in ("train", "test"):
        batch = pickle.loads((folder / split).read_bytes(), encoding="bytes")
        images, labels = coarse.split(split)
        np.testing.assert_array_equal(labels, batch[b"coarse_labels"])
        np.testing.assert_array_equal(images, fine.split(split)[0])
    # The spec-string spelling and the archive give the same.
    archive = tar_gz(folder, tmp_path / "cifar-100-python.tar.gz")
    assert_same_source(coarse, load_source(f"cifar100:{archive}?labels=coarse"))


def test_cifar100_labels_option_is_validated(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(LoadbenchError, match="labels") as err:
        load_source(f"cifar100:{tmp_path}", labels="superclass")
    assert "fine or coarse" in str(err.value)


def test_cifar10_folder_without_batches_meta(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "batches.meta").unlink()
    for path in (folder, cifar10_root):
        with pytest.raises(LoadbenchError, match="batches.meta") as err:
            load_source(f"cifar10:{path}")
        assert str(path) in str(err.value)


def test_cifar10_missing_batch_is_named(cifar10_root, tmp_path):
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "data_batch_4").unlink()
    with pytest.raises(LoadbenchError, match="data_batch_4"):
        load_source(f"cifar10:{folder}")
    archive = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(LoadbenchError, match="data_batch_4") as err:
        load_source(f"cifar10:{archive}")
    assert str(archive) in str(err.value)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_cifar10_truncated_batch(cifar10_root, keep):
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    data = batch.read_bytes()
    batch.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LoadbenchError) as err:
        load_source(f"cifar10:{cifar10_root}")
    assert str(batch) in str(err.value)
    assert "truncated" in str(err.value)


def test_cifar10_truncated_archive(cifar10_root, tmp_path):
    archive = tar_gz(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadbenchError) as err:
        load_source(f"cifar10:{archive}")
    assert str(archive) in str(err.value)


@pytest.mark.parametrize("where", ["batches.meta", "data_batch_2", "nested", "archive"])
def test_cifar10_malicious_pickle_runs_nothing(cifar10_root, tmp_path, where):
    pwned = tmp_path / "pwned.txt"
    evil = Evil(f"echo pwned > {pwned}")
    folder = cifar10_root / "cifar-10-batches-py"
    if where == "nested":
        # Hidden inside an otherwise well-formed batch, after the real entries.
        batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
        batch[b"filenames"].append(evil)
        target = folder / "test_batch"
        target.write_bytes(pickle.dumps(batch, protocol=2))
    else:
        target = folder / ("data_batch_2" if where == "archive" else where)
        target.write_bytes(pickle.dumps(evil, protocol=2))
    path = folder
    if where == "archive":
        path = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
        shutil.rmtree(folder)
    with pytest.raises(LoadbenchError) as err:
        load_source(f"cifar10:{path}")
    assert not pwned.exists()
    assert target.name in str(err.value)
    assert "system" in str(err.value)  # says what it refused to build


def test_cifar10_bad_batch_contents(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    batch = pickle.loads((folder / "data_batch_5").read_bytes(), encoding="bytes")
    good = dict(batch)

    batch[b"labels"] = [*batch[b"labels"][:-1], 10]  # class 10 of 0..9
    (folder / "data_batch_5").write_bytes(cifar_pickle(batch))
    with pytest.raises(LoadbenchError, match=r"data_batch_5.*labels outside 0\.\.9"):
        load_source(f"cifar10:{folder}")

    batch = {**good, b"labels": good[b"labels"][:-1]}
    (folder / "data_batch_5").write_bytes(cifar_pickle(batch))
    with pytest.raises(LoadbenchError, match=r"data_batch_5: 4 images but 3 labels"):
        load_source(f"cifar10:{folder}")

    batch = {**good, b"data": good[b"data"][:, :3000]}
    (folder / "data_batch_5").write_bytes(cifar_pickle(batch))
    with pytest.raises(LoadbenchError, match=r"data_batch_5.*expected uint8 \(N, 3072\)"):
        load_source(f"cifar10:{folder}")


# =============================================================================================
# MNIST / Fashion-MNIST IDX files


@pytest.fixture
def fashion_root(tmp_path: Path) -> tuple[Path, dict]:
    """A torchvision root: root/FashionMNIST/raw/ with the four plain IDX files."""
    root = tmp_path / "tv-root"
    written = write_idx_dataset(root / "FashionMNIST" / "raw", n_train=40, n_test=20, seed=3)
    return root, written


def test_fashion_mnist_matches_torchvision(fashion_root):
    from torchvision.datasets import FashionMNIST

    root, written = fashion_root
    source = load_source(f"fashion-mnist:{root}")
    assert source.splits == ["train", "test"]
    assert source.image_shape == (28, 28, 1)
    for split, train in (("train", True), ("test", False)):
        tv = FashionMNIST(str(root), train=train, download=False)
        assert source.classes == tv.classes == FASHION_CLASSES
        images, labels = source.split(split)
        assert images.shape == (len(tv), 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[..., 0], tv.data.numpy())
        np.testing.assert_array_equal(labels, tv.targets.numpy())
        np.testing.assert_array_equal(images[..., 0], written[split][0])


def test_mnist_matches_torchvision(tmp_path):
    from torchvision.datasets import MNIST

    root = tmp_path / "tv-root"
    write_idx_dataset(root / "MNIST" / "raw", n_train=12, n_test=6, seed=5)
    source = load_source(f"mnist:{root}")
    assert source.classes == [str(i) for i in range(10)]
    for split, train in (("train", True), ("test", False)):
        tv = MNIST(str(root), train=train, download=False)
        images, labels = source.split(split)
        np.testing.assert_array_equal(images[..., 0], tv.data.numpy())
        np.testing.assert_array_equal(labels, tv.targets.numpy())


def test_idx_folder_raw_and_gz_read_the_same(fashion_root, tmp_path):
    root, written = fashion_root
    from_root = load_source(f"fashion-mnist:{root}")
    for path in (root / "FashionMNIST", root / "FashionMNIST" / "raw"):
        assert_same_source(from_root, load_source(f"fashion-mnist:{path}"))
    gz = tmp_path / "gz"
    gz_written = write_idx_dataset(gz, n_train=40, n_test=20, seed=3, gz=True)
    assert sorted(p.name for p in gz.iterdir()) == sorted(
        n + ".gz" for pair in IDX_FILES.values() for n in pair
    )
    for split in ("train", "test"):
        np.testing.assert_array_equal(gz_written[split][0], written[split][0])
    assert_same_source(from_root, load_source(f"fashion-mnist:{gz}"))


def test_idx_train_only_folder(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    for name in IDX_FILES["test"]:
        (tmp_path / name).unlink()
    source = load_source(f"mnist:{tmp_path}")
    assert source.splits == ["train"] and source.count("train") == 10


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_image_file(tmp_path, gz):
    write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    if gz:
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[:-100]))
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoadbenchError) as err:
        load_source(f"fashion-mnist:{tmp_path}")
    assert str(path) in str(err.value)
    assert "truncated" in str(err.value)
    assert str(16 + 10 * 784) in str(err.value)  # the size the header asks for


def test_idx_cut_gzip_stream_is_named(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LoadbenchError) as err:
        load_source(f"mnist:{tmp_path}")
    assert str(path) in str(err.value)


def test_idx_wrong_magic(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    images.write_bytes(labels.read_bytes())  # magic 0x00000801 where 0x00000803 is expected
    with pytest.raises(LoadbenchError) as err:
        load_source(f"mnist:{tmp_path}")
    assert str(images) in str(err.value)
    assert "00000801" in str(err.value) and "00000803" in str(err.value)
    # Not an IDX file at all (a PNG under the IDX name).
    images.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(LoadbenchError, match="not an IDX file") as err:
        load_source(f"mnist:{tmp_path}")
    assert str(images) in str(err.value)


def test_idx_count_mismatch(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(LoadbenchError) as err:
        load_source(f"mnist:{tmp_path}")
    message = str(err.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in message and str(labels) in message
    assert "5 images" in message and "4 labels" in message


def test_idx_missing_labels_and_bad_label_values(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], dtype=np.uint8)))
    with pytest.raises(LoadbenchError, match=r"labels outside 0\.\.9") as err:
        load_source(f"mnist:{tmp_path}")
    assert str(labels) in str(err.value)
    labels.unlink()
    with pytest.raises(LoadbenchError, match="train-labels-idx1-ubyte") as err:
        load_source(f"mnist:{tmp_path}")
    assert str(tmp_path) in str(err.value)


def test_idx_test_images_of_another_size(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 20, 20), dtype=np.uint8)))
    with pytest.raises(LoadbenchError) as err:
        load_source(f"mnist:{tmp_path}").split("test")
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Class remapping (the study's Fashion-MNIST: upper body / trousers / shoes, no bags)

STUDY_REMAP = "upper=0,2,3,4,6;trousers=1;shoes=5,7,9"
OLD_TO_NEW = {0: 0, 2: 0, 3: 0, 4: 0, 6: 0, 1: 1, 5: 2, 7: 2, 9: 2}


@pytest.mark.parametrize(
    "options",
    [
        {"remap": STUDY_REMAP, "drop": "8"},
        {"remap": STUDY_REMAP, "drop": "Bag"},
        {"remap": STUDY_REMAP, "drop": ["Bag"]},
        {"remap": STUDY_REMAP, "drop": 8},
        {
            "remap": {
                "upper": ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"],
                "trousers": ["Trouser"],
                "shoes": ["Sandal", "Sneaker", "Ankle boot"],
            },
            "drop": ["Bag"],
        },
    ],
    ids=["drop-8", "drop-Bag", "drop-list", "drop-int", "remap-by-name"],
)
def test_fashion_remap_of_the_study(fashion_root, options):
    root, written = fashion_root
    source = load_source(f"fashion-mnist:{root}", **options)
    assert source.classes == ["upper", "trousers", "shoes"]
    for split in ("train", "test"):
        raw_images, raw_labels = written[split]
        keep = raw_labels != 8
        assert (~keep).sum() >= 1  # the tree does have bags to remove
        images, labels = source.split(split)
        assert source.count(split) == keep.sum()
        np.testing.assert_array_equal(images[..., 0], raw_images[keep])
        np.testing.assert_array_equal(labels, [OLD_TO_NEW[int(v)] for v in raw_labels[keep]])
    spec = f"fashion-mnist:{root}?remap={STUDY_REMAP}&drop=Bag"
    assert_same_source(source, load_source(spec))


def test_fashion_drop_only(fashion_root):
    root, written = fashion_root
    source = load_source(f"fashion-mnist:{root}?drop=Bag,Sandal")
    assert source.classes == [c for c in FASHION_CLASSES if c not in ("Bag", "Sandal")]
    raw_labels = written["train"][1]
    keep = ~np.isin(raw_labels, [5, 8])
    old_to_new = {old: new for new, old in enumerate(i for i in range(10) if i not in (5, 8))}
    np.testing.assert_array_equal(
        source.labels("train"), [old_to_new[int(v)] for v in raw_labels[keep]]
    )


def test_remap_errors(fashion_root):
    root, _ = fashion_root
    with pytest.raises(LoadbenchError, match="unknown class 'Sock'") as err:
        load_source(f"fashion-mnist:{root}", remap="upper=0,2,3,4,6;feet=Sock", drop="8")
    assert "8=Bag" in str(err.value)  # lists the classes there are
    with pytest.raises(LoadbenchError, match="unknown class '12'"):
        load_source(f"fashion-mnist:{root}", drop="12")
    with pytest.raises(LoadbenchError) as err:
        load_source(f"fashion-mnist:{root}", remap=STUDY_REMAP)  # Bag goes nowhere
    assert "'Bag'" in str(err.value) and "drop" in str(err.value)
    with pytest.raises(LoadbenchError) as err:
        load_source(f"fashion-mnist:{root}", remap="upper=0,2,3,4,6;trousers=1")
    for name in ("'Sandal'", "'Sneaker'", "'Bag'", "'Ankle boot'"):
        assert name in str(err.value)
    with pytest.raises(LoadbenchError, match="twice"):
        load_source(f"fashion-mnist:{root}", remap=STUDY_REMAP + ";bags=8,0")
    with pytest.raises(LoadbenchError, match="NEW=OLD"):
        load_source(f"fashion-mnist:{root}", remap="upper")


# =============================================================================================
# Tiny ImageNet


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    return write_tiny_imagenet(tmp_path / "data")


def test_tiny_imagenet_layout(tiny_root):
    from torchvision.datasets import ImageFolder

    source = load_source(f"tiny-imagenet:{tiny_root}")
    wnids = sorted(TINY_WNIDS)
    assert source.classes == wnids
    assert source.splits == ["train", "val"]  # test/ has no labels and is not read
    assert source.image_shape == (64, 64, 3)
    assert source.details["class_descriptions"] == {w: TINY_WORDS[w] for w in wnids}

    tv = ImageFolder(str(tiny_root / "train"))
    assert tv.classes == wnids
    images, labels = source.split("train")
    assert images.shape == (len(tv), 64, 64, 3) == (6, 64, 64, 3)
    np.testing.assert_array_equal(labels, tv.targets)
    for k, (path, _) in enumerate(tv.samples):
        np.testing.assert_array_equal(images[k], pil_rgb(path))
    gray = [k for k, (p, _) in enumerate(tv.samples) if p.endswith("n02000002_1.JPEG")]
    assert len(gray) == 1
    with Image.open(tv.samples[gray[0]][0]) as im:
        assert im.mode == "L"
    g = images[gray[0]]
    assert g.shape == (64, 64, 3)
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    np.testing.assert_array_equal(g[..., 0], g[..., 2])

    val_images, val_labels = source.split("val")
    index = {w: i for i, w in enumerate(wnids)}
    annotations = (tiny_root / "val" / "val_annotations.txt").read_text().splitlines()
    assert val_labels.tolist() == [index[line.split("\t")[1]] for line in annotations]
    assert val_labels.tolist() == [1, 2, 0, 1]
    for k, line in enumerate(annotations):
        file = tiny_root / "val" / "images" / line.split("\t")[0]
        np.testing.assert_array_equal(val_images[k], pil_rgb(file))

    assert_same_source(source, load_source(f"tiny-imagenet:{tiny_root.parent}"))


def test_tiny_imagenet_size_and_channels(tiny_root):
    source = load_source(f"tiny-imagenet:{tiny_root}?size=32&channels=1")
    images, labels = source.split("val")
    assert images.shape == (4, 32, 32, 1) and source.image_shape == (32, 32, 1)
    assert labels.tolist() == [1, 2, 0, 1]


def test_tiny_imagenet_missing_wnids(tiny_root):
    (tiny_root / "wnids.txt").unlink()
    with pytest.raises(LoadbenchError, match="wnids.txt") as err:
        load_source(f"tiny-imagenet:{tiny_root}")
    assert str(tiny_root) in str(err.value)


def test_tiny_imagenet_unknown_val_wnid(tiny_root):
    notes = tiny_root / "val" / "val_annotations.txt"
    lines = notes.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("n01000001", "n04444444")
    notes.write_text("".join(lines))
    with pytest.raises(LoadbenchError, match="n04444444") as err:
        load_source(f"tiny-imagenet:{tiny_root}")
    assert f"{notes}:3" in str(err.value)


def test_tiny_imagenet_corrupt_jpeg(tiny_root):
    bad = tiny_root / "train" / "n02000002" / "images" / "n02000002_0.JPEG"
    bad.write_bytes(b"\x00garbage" + corrupt_bytes())
    with pytest.raises(LoadbenchError) as err:
        load_source(f"tiny-imagenet:{tiny_root}").split("train")
    assert str(bad) in str(err.value)

    source = load_source(f"tiny-imagenet:{tiny_root}", skip_corrupt=True)
    assert source.count("train") == 5 and source.count("val") == 4
    assert any("skipped 1 corrupt" in note and "train" in note for note in source.notes)
    images, labels = source.split("train")
    assert labels.tolist() == [0, 0, 1, 2, 2]
    good = tiny_root / "train" / "n02000002" / "images" / "n02000002_1.JPEG"
    np.testing.assert_array_equal(images[2], pil_rgb(good))


def test_tiny_imagenet_already_has_val(tiny_root):
    with pytest.raises(LoadbenchError, match="val_ratio") as err:
        load_source(f"tiny-imagenet:{tiny_root}", val_ratio=0.2)
    assert "'val'" in str(err.value)
    source = load_source(f"tiny-imagenet:{tiny_root}", test_ratio=0.5, seed=1)
    assert source.splits == ["train", "val", "test"]
    assert source.count("train") + source.count("test") == 6
    assert sorted(source.labels("test").tolist()) == [0, 1, 2]


# =============================================================================================
# Image folders (ImageFolder layout)


def write_mixed_tree(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """cat/, dog/, emu/ with PNGs and JPEGs of different sizes, a nested folder, non-images.

    Returns the arrays of the PNG files by relative path (PNG is lossless).
    """
    rng = np.random.default_rng(seed)
    pngs = {}
    files = {
        "cat/a.jpg": (50, 50, "JPEG"),
        "cat/b.png": (30, 40, "PNG"),  # 40 wide, 30 high
        "cat/sub/c.png": (50, 50, "PNG"),
        "dog/x.PNG": (50, 50, "PNG"),
        "dog/y.jpeg": (40, 30, "JPEG"),
        "emu/deep/er/z.png": (64, 48, "PNG"),
    }
    for rel, (h, w, fmt) in files.items():
        array = random_rgb(rng, h, w)
        save_image(root / rel, array, fmt)
        if fmt == "PNG":
            pngs[rel] = array
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "emu" / "labels.csv").write_text("file,label\n")
    (root / "README.md").write_text("a file beside the class folders")
    return pngs


def test_folder_resizes_to_size_and_defaults_to_first_image(tmp_path):
    pngs = write_mixed_tree(tmp_path)
    source = load_source(f"folder:{tmp_path}", size="32")
    assert source.classes == ["cat", "dog", "emu"]
    assert source.splits == ["train"]
    images, labels = source.split("train")
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]

    default = load_source(f"folder:{tmp_path}")  # first image: cat/a.jpg, 50x50
    assert default.image_shape == (50, 50, 3)
    images, labels = default.split("train")
    assert images.shape == (6, 50, 50, 3)
    # Images already of the target size come back bit-exact.
    np.testing.assert_array_equal(images[0], pil_rgb(tmp_path / "cat/a.jpg"))
    np.testing.assert_array_equal(images[2], pngs["cat/sub/c.png"])
    np.testing.assert_array_equal(images[3], pngs["dog/x.PNG"])

    rect = load_source(f"folder:{tmp_path}?size=24x36")
    assert rect.split("train")[0].shape == (6, 24, 36, 3)


def test_folder_order_matches_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(1)
    names = [
        "zebra/1.png", "zebra/0.jpg", "ant/b/2.png", "ant/a/1.JPG", "ant/0.png",
        "ant/a/b/3.png", "Bee/x.bmp", "bee/y.webp", "bee/z.PNG", "bee/w.tiff",
    ]  # fmt: skip
    for name in names:
        fmt = {".jpg": "JPEG", ".bmp": "BMP", ".webp": "WEBP", ".tiff": "TIFF"}.get(
            Path(name).suffix.lower(), "PNG"
        )
        save_image(tmp_path / name, random_rgb(rng, 12, 10), fmt)
    (tmp_path / "ant" / "a" / "notes.txt").write_text("x")
    (tmp_path / "bee" / "y.webp.txt").write_text("x")
    (tmp_path / "zebra" / "image.jpg.bak").write_bytes(b"x")
    tv = ImageFolder(str(tmp_path))
    source = load_source(f"folder:{tmp_path}")
    assert source.classes == tv.classes == ["Bee", "ant", "bee", "zebra"]
    images, labels = source.split("train")
    assert len(labels) == len(tv.samples) == 10
    np.testing.assert_array_equal(labels, tv.targets)
    for k, (path, _) in enumerate(tv.samples):
        np.testing.assert_array_equal(images[k], pil_rgb(path), err_msg=path)


def test_folder_original_sizes(tmp_path):
    write_mixed_tree(tmp_path)
    source = load_source(f"folder:{tmp_path}", size="32")
    sizes = source.original_sizes("train")
    order = ["cat/a.jpg", "cat/b.png", "cat/sub/c.png", "dog/x.PNG", "dog/y.jpeg"]
    order.append("emu/deep/er/z.png")
    assert sizes.width.tolist() == [50, 40, 50, 50, 30, 48]
    assert sizes.height.tolist() == [50, 30, 50, 50, 40, 64]
    assert sizes.file_bytes.tolist() == [os.path.getsize(tmp_path / p) for p in order]
    limited = load_source(f"folder:{tmp_path}", size="32", drop="cat")
    assert limited.original_sizes("train").width.tolist() == [50, 30, 48]


def test_folder_channels_1(tmp_path):
    pngs = write_mixed_tree(tmp_path)
    source = load_source(f"folder:{tmp_path}?channels=1&size=50")
    images, _ = source.split("train")
    assert images.shape == (6, 50, 50, 1) and source.image_shape == (50, 50, 1)
    expected = np.asarray(Image.fromarray(pngs["cat/sub/c.png"]).convert("L"))
    np.testing.assert_array_equal(images[2, :, :, 0], expected)
    with pytest.raises(LoadbenchError, match="channels"):
        load_source(f"folder:{tmp_path}", channels=4)


def test_folder_split_layout(tmp_path):
    rng = np.random.default_rng(2)
    for rel in ["train/a/0.png", "train/a/1.png", "train/b/0.png", "train/c/0.png"]:
        save_image(tmp_path / rel, random_rgb(rng, 8, 8), "PNG")
    for rel in ["test/a/0.png", "test/c/0.png", "test/c/1.png"]:
        save_image(tmp_path / rel, random_rgb(rng, 8, 8), "PNG")
    source = load_source(f"folder:{tmp_path}")
    assert source.splits == ["train", "test"]
    assert source.classes == ["a", "b", "c"]
    assert source.labels("train").tolist() == [0, 0, 1, 2]
    assert source.labels("test").tolist() == [0, 2, 2]  # test lacks b: indices stay train's
    np.testing.assert_array_equal(
        source.split("test")[0][1], np.asarray(Image.open(tmp_path / "test/c/0.png"))
    )
    save_image(tmp_path / "val/b/0.png", random_rgb(rng, 8, 8), "PNG")
    assert load_source(f"folder:{tmp_path}").splits == ["train", "val", "test"]

    save_image(tmp_path / "test/zebra/0.png", random_rgb(rng, 8, 8), "PNG")
    with pytest.raises(LoadbenchError, match="zebra") as err:
        load_source(f"folder:{tmp_path}")
    assert str(tmp_path / "test") in str(err.value)


def test_folder_corrupt_file(tmp_path):
    write_mixed_tree(tmp_path)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"\x00garbage" + corrupt_bytes())
    truncated = tmp_path / "emu" / "cut.jpg"
    good_jpeg = (tmp_path / "cat" / "a.jpg").read_bytes()
    truncated.write_bytes(good_jpeg[: len(good_jpeg) // 3])
    with pytest.raises(LoadbenchError) as err:
        load_source(f"folder:{tmp_path}", size="32").split("train")
    assert str(bad) in str(err.value)
    bad.unlink()
    with pytest.raises(LoadbenchError) as err:
        load_source(f"folder:{tmp_path}", size="32").split("train")
    assert str(truncated) in str(err.value)
    bad.write_bytes(b"\x00garbage" + corrupt_bytes())

    source = load_source(f"folder:{tmp_path}", size="32", skip_corrupt=True)
    images, labels = source.split("train")
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert images.shape == (6, 32, 32, 3)
    assert any("skipped 2 corrupt" in note for note in source.notes)
    assert_same_source(source, load_source(f"folder:{tmp_path}?size=32&skip_corrupt=true"))


def test_folder_skip_corrupt_when_the_first_file_is_corrupt(tmp_path):
    write_mixed_tree(tmp_path)
    (tmp_path / "cat" / "0-broken.png").write_bytes(b"\x00garbage" + corrupt_bytes())
    source = load_source(f"folder:{tmp_path}", skip_corrupt=True)
    assert source.count("train") == 6
    assert source.image_shape == (50, 50, 3)  # the first readable image, cat/a.jpg


def test_folder_resize_matches_torchvision_resize_center_crop(tmp_path):
    from torchvision import transforms

    rng = np.random.default_rng(4)
    for name, (h, w) in {"a/wide.png": (30, 40), "a/tall.png": (100, 70)}.items():
        save_image(tmp_path / name, random_rgb(rng, h, w), "PNG")
    images, _ = load_source(f"folder:{tmp_path}", size="32").split("train")
    tv = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])
    for k, name in enumerate(["a/tall.png", "a/wide.png"]):
        with Image.open(tmp_path / name) as im:
            expected = np.asarray(tv(im.convert("RGB")))
        np.testing.assert_array_equal(images[k], expected, err_msg=name)


def test_folder_size_as_int_keyword(tmp_path):
    write_mixed_tree(tmp_path)
    assert load_source(f"folder:{tmp_path}", size=32).image_shape == (32, 32, 3)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadbenchError, match="no class folders") as err:
        load_source(f"folder:{empty}")
    assert str(empty) in str(err.value)
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("x")
    with pytest.raises(LoadbenchError, match="no image files"):
        load_source(f"folder:{empty}")
    file = tmp_path / "one.png"
    save_image(file, random_rgb(np.random.default_rng(0), 4, 4), "PNG")
    with pytest.raises(LoadbenchError, match="not a directory") as err:
        load_source(f"folder:{file}")
    assert str(file) in str(err.value)
    write_mixed_tree(tmp_path / "tree")
    with pytest.raises(LoadbenchError, match="size 'big'"):
        load_source(f"folder:{tmp_path / 'tree'}", size="big")


# =============================================================================================
# Options common to every source


@pytest.fixture
def labelled_idx(tmp_path: Path) -> tuple[Path, dict]:
    """Fashion-MNIST files with chosen labels: train 3,3,3,1,1,0,2,2,2,2 + 30 more."""
    train = np.array([3, 3, 3, 1, 1, 0, 2, 2, 2, 2] + [k % 10 for k in range(30)])
    test = np.array([k % 4 for k in range(12)])
    written = write_idx_dataset(
        tmp_path / "idx",
        n_train=len(train),
        n_test=len(test),
        labels={"train": train, "test": test},
        seed=9,
    )
    return tmp_path / "idx", written


def first_of_each_class(labels: np.ndarray, positions: list[int]) -> bool:
    """Whether the chosen positions are, for every class, the first positions of that class."""
    for c in np.unique(labels[positions]):
        chosen = [p for p in positions if labels[p] == c]
        if chosen != np.flatnonzero(labels == c)[: len(chosen)].tolist():
            return False
    return True


def test_limit_first_n_stratified_in_original_order(labelled_idx):
    path, _ = labelled_idx
    drop = [str(c) for c in range(4, 10)]  # keep classes 0..3: train 0,1,2,3 = 4,5,7,6 images
    full = load_source(f"fashion-mnist:{path}", drop=drop)
    full_images, full_labels = full.split("train")
    assert np.bincount(full_labels).tolist() == [4, 5, 7, 6]
    for n in (1, 3, 4, 5, 6, 9, 13, 16, 20, 21):
        limited = load_source(f"fashion-mnist:{path}", drop=drop, limit=n)
        images, labels = limited.split("train")
        assert len(labels) == n
        positions = [rows(full_images).index(r) for r in rows(images)]
        assert positions == sorted(positions)  # original order kept
        np.testing.assert_array_equal(labels, full_labels[positions])
        assert first_of_each_class(full_labels, positions)
        counts = np.bincount(labels, minlength=4)
        if n <= 16:  # every class has at least 4 images: an even spread is possible
            assert counts.max() - counts.min() <= 1
        else:  # class 0 (4 images) gives its unused share to the others
            assert counts[0] == 4 and counts[1:].min() >= (n - 4) // 3
        if n >= 4:
            assert set(labels.tolist()) == {0, 1, 2, 3}
        assert limited.count("test") == min(n, 12)
    everything = load_source(f"fashion-mnist:{path}", drop=drop, limit=1000)
    assert_same_source(full, everything)


def test_limit_of_a_balanced_split_is_the_first_images(labelled_idx):
    path, written = labelled_idx  # test labels: 0,1,2,3,0,1,2,3,0,1,2,3
    source = load_source(f"fashion-mnist:{path}", limit=6)
    images, labels = source.split("test")
    assert labels.tolist() == [0, 1, 2, 3, 0, 1]
    np.testing.assert_array_equal(images[..., 0], written["test"][0][:6])


def test_limit_on_cifar_and_folder(cifar10_root, tmp_path):
    full = load_source(f"cifar10:{cifar10_root}")
    limited = load_source(f"cifar10:{cifar10_root}", limit=4)
    assert limited.count("train") == 4 and limited.count("test") == 4
    full_images, full_labels = full.split("train")
    images, labels = limited.split("train")
    positions = [rows(full_images).index(r) for r in rows(images)]
    assert positions == sorted(positions)  # original order kept
    np.testing.assert_array_equal(labels, full_labels[positions])
    assert len(set(labels.tolist())) == min(4, len(set(full_labels.tolist())))

    write_mixed_tree(tmp_path / "tree")
    folder = load_source(f"folder:{tmp_path / 'tree'}?size=16&limit=3")
    assert folder.labels("train").tolist() == [0, 1, 2]
    assert folder.original_sizes("train").width.tolist() == [50, 50, 48]


def test_val_ratio_is_seeded_stratified_and_disjoint(labelled_idx):
    path, written = labelled_idx
    raw_labels = written["train"][1]
    a = load_source(f"fashion-mnist:{path}", val_ratio=0.25, seed=3)
    b = load_source(f"fashion-mnist:{path}?val_ratio=0.25&seed=3")
    assert a.splits == ["train", "val", "test"]
    assert_same_source(a, b)
    train_images, train_labels = a.split("train")
    val_images, val_labels = a.split("val")
    # Stratified: round(0.25 * count) of every class (at least one where the class has two).
    counts = np.bincount(raw_labels, minlength=10)
    expected = [max(1 if c > 1 else 0, round(0.25 * c)) for c in counts]
    assert np.bincount(val_labels, minlength=10).tolist() == expected
    # Disjoint, and together the whole of the original train split, labels kept.
    assert not set(rows(train_images)) & set(rows(val_images))
    originals = dict(zip(rows(written["train"][0][..., None]), raw_labels.tolist(), strict=True))
    together = rows(train_images) + rows(val_images)
    assert sorted(together) == sorted(originals)
    assert [originals[r] for r in together] == train_labels.tolist() + val_labels.tolist()
    # Train keeps its original order.
    positions = [list(originals).index(r) for r in rows(train_images)]
    assert positions == sorted(positions)
    # The test split is untouched.
    np.testing.assert_array_equal(a.split("test")[0][..., 0], written["test"][0])
    others = [load_source(f"fashion-mnist:{path}", val_ratio=0.25, seed=s) for s in range(4, 8)]
    assert any(not np.array_equal(o.split("val")[0], val_images) for o in others)


def test_test_ratio_needs_a_source_without_test(tmp_path, labelled_idx):
    write_mixed_tree(tmp_path / "tree")
    source = load_source(f"folder:{tmp_path / 'tree'}?size=8", test_ratio=0.5, val_ratio=0.5)
    assert source.splits == ["train", "val", "test"]
    # cat 3, dog 2, emu 1: test takes round(0.5 * n) per class (emu's one image stays), then
    # val finds one image per class left, and round(0.5) == 0.
    assert [source.count(s) for s in source.splits] == [3, 0, 3]
    assert sorted(source.labels("test").tolist()) == [0, 0, 1]
    path, _ = labelled_idx
    with pytest.raises(LoadbenchError, match="test_ratio") as err:
        load_source(f"fashion-mnist:{path}", test_ratio=0.2)
    assert "'test'" in str(err.value)


@pytest.mark.parametrize(
    ("kind", "option"), [("cifar10", "size"), ("fashion-mnist", "skip_corrupt"), ("folder", "lmit")]
)
def test_unknown_option_lists_known_options(tmp_path, kind, option):
    with pytest.raises(LoadbenchError) as err:
        load_source(f"{kind}:{tmp_path}", **{option: "1"})
    message = str(err.value)
    assert f"unknown option {option!r}" in message
    for known in ("limit", "remap", "drop", "val_ratio", "test_ratio", "seed"):
        assert known in message
    with pytest.raises(LoadbenchError, match=f"unknown option {option!r}"):
        load_source(f"{kind}:{tmp_path}?{option}=1")


def test_bad_option_values(cifar10_root):
    for options in ({"limit": 0}, {"limit": "many"}, {"val_ratio": 1.5}, {"seed": "x"}):
        with pytest.raises(LoadbenchError, match=next(iter(options))):
            load_source(f"cifar10:{cifar10_root}", **options)


def test_spec_string_options_equal_keywords(cifar10_root, tmp_path):
    assert_same_source(
        load_source(f"cifar10:{cifar10_root}?limit=4"),
        load_source(f"cifar10:{cifar10_root}", limit=4),
    )
    # Keywords win over the spec's options.
    assert load_source(f"cifar10:{cifar10_root}?limit=4", limit=6).count("train") == 6
    write_mixed_tree(tmp_path / "tree")
    tree = tmp_path / "tree"
    assert_same_source(
        load_source(f"folder:{tree}?size=20x16&channels=1&drop=dog"),
        load_source(f"folder:{tree}", size="20x16", channels=1, drop="dog"),
    )


def test_canonical_spec_reloads_the_same_source(fashion_root):
    root, _ = fashion_root
    source = load_source(f"fashion-mnist:{root}", remap=STUDY_REMAP, drop="Bag", limit=9)
    again = load_source(source.spec)
    assert_same_source(source, again)
    assert again.spec == source.spec


@pytest.mark.parametrize(
    "kind", ["cifar10", "cifar100", "mnist", "fashion-mnist", "tiny-imagenet", "folder"]
)
def test_missing_path_is_named(tmp_path, kind):
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(LoadbenchError) as err:
        load_source(f"{kind}:{missing}")
    assert str(missing) in str(err.value)
    assert "does not exist" in str(err.value)
    with pytest.raises(LoadbenchError, match="PATH"):
        load_source(kind)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("cifar10", "batches.meta"),
        ("cifar100", "meta"),
        ("mnist", "train-images-idx3-ubyte"),
        ("tiny-imagenet", "wnids.txt"),
    ],
)
def test_wrong_folder_says_what_was_expected(tmp_path, kind, expected):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(LoadbenchError, match=expected) as err:
        load_source(f"{kind}:{tmp_path}")
    assert str(tmp_path) in str(err.value)
