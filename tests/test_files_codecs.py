"""files-jp2 and files-webp: lossless (exact) by default, lossy (judged by PSNR) with their
option, ImageFolder's layout, the decoder's checks, clear errors for bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import loadbench
from loadbench.errors import CorruptStoreError, LoadbenchError
from loadbench.formats import codecs, expand_names, get_format, pillow_codecs
from loadbench.verify import verify_path

FORMATS = ["files-jp2", "files-webp"]
LOSSY = {"files-jp2": {"jp2_rate": 4}, "files-webp": {"webp_quality": 90}}
EXT = {"files-jp2": "jp2", "files-webp": "webp"}


def needs(name: str) -> None:
    """Skip where this Pillow lacks the format's codec, saying so."""
    if note := get_format(name).missing():
        pytest.skip(note)


def odd_source(shape: tuple[int, int, int], seed: int = 0):
    """Noise over a gradient at an odd size: the worst case for exactness, and both splits."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    ramp = np.linspace(0, 200, h * w).reshape(h, w, 1)

    def images(n):
        return (ramp + rng.integers(0, 56, (n, h, w, c))).astype(np.uint8)

    return loadbench.sources.from_arrays(
        {"train": (images(9), np.arange(9) % 3), "test": (images(4), [2, 0, 1, 1])},
        classes=["a", "b", "c"],
    )


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "loadbench", *map(str, args)],
        capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def files_bytes(store) -> int:
    return sum(p.stat().st_size for p in (store / "train").rglob("*.*") if p.suffix != ".npy")


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(28, 28, 1), (33, 17, 3), (17, 33, 1), (1, 1, 3)])
def test_lossless_by_default_and_exact(tmp_path, name, shape):
    needs(name)
    source = odd_source(shape)
    store = loadbench.convert(source, name, tmp_path / "s")
    assert store.manifest.lossy is False
    images, labels = source.split("train")
    got, got_labels = store.raw("train").read_batch(np.arange(len(labels)))
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    checks = verify_path(tmp_path / "s", source)
    assert all(c.passed and c.exact_images == c.count for c in checks), checks
    assert all(c.psnr_db is None for c in checks)  # judged exactly, not by PSNR
    assert len(list((tmp_path / "s" / "train").rglob(f"*.{EXT[name]}"))) == 9


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("preset", ["cifar-like?size=32", "mnist-like"])
def test_lossy_with_the_option_and_judged_by_psnr(tmp_path, name, preset):
    needs(name)
    spec = f"synthetic:{preset}{'&' if '?' in preset else '?'}count=16&eval_count=4&classes=4"
    options = {"jp2_rate": 2} if name == "files-jp2" and preset == "mnist-like" else LOSSY[name]
    store = loadbench.convert(spec, name, tmp_path / "s", **options)
    assert store.manifest.lossy is True
    assert get_format(name).is_lossy(store.manifest.options)
    checks = verify_path(tmp_path / "s", spec)
    assert all(c.checksum_ok for c in checks)  # the checksums cover the decoded pixels
    assert all(c.passed and c.exact_images < c.count for c in checks), checks
    assert min(c.psnr_db for c in checks) > 30
    strict = verify_path(tmp_path / "s", spec, psnr_threshold_db=80)
    assert not any(c.passed for c in strict)


@pytest.mark.parametrize("name", FORMATS)
def test_lossy_files_are_smaller_than_lossless_ones(tmp_path, name):
    needs(name)
    spec = "synthetic:cifar-like?count=16&eval_count=4&size=32&classes=4"
    loadbench.convert(spec, name, tmp_path / "lossless")
    loadbench.convert(spec, name, tmp_path / "lossy", **LOSSY[name])
    assert files_bytes(tmp_path / "lossy") < 0.6 * files_bytes(tmp_path / "lossless")


def test_imagefolder_takes_webp_files_and_not_jp2_files():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert ".webp" in IMG_EXTENSIONS and ".jp2" not in IMG_EXTENSIONS  # what the summaries say
    assert "ImageFolder" in get_format("files-jp2").summary


def test_imagefolder_on_a_webp_split_sees_the_store_labels(tmp_path):
    needs("files-webp")
    from torchvision.datasets import ImageFolder

    source = odd_source((13, 11, 3))
    loadbench.convert(source, "files-webp", tmp_path / "s")
    folder = ImageFolder(str(tmp_path / "s" / "train"))
    labels = np.load(tmp_path / "s" / "train" / "labels.npy")
    images, _ = source.split("train")
    assert len(folder) == len(labels)
    for k, (path, target) in enumerate(folder.samples):  # a file is named by its store index
        index = int(path.rsplit("/", 1)[1].split(".")[0])
        assert target == labels[index]
        np.testing.assert_array_equal(np.asarray(folder[k][0]), images[index])


@pytest.mark.parametrize("name", FORMATS)
def test_a_damaged_file_is_the_damaged_store_error(tmp_path, name):
    needs(name)
    loadbench.convert(odd_source((16, 16, 3)), name, tmp_path / "s")
    path = sorted((tmp_path / "s" / "train").rglob(f"*.{EXT[name]}"))[0]
    path.write_bytes(path.read_bytes()[:60])
    reader = loadbench.open_store(tmp_path / "s").raw("train")
    with pytest.raises(CorruptStoreError, match=rf"is damaged: cannot decode .*{path.name}"):
        reader.read_batch(np.arange(reader.count))
    checks = verify_path(tmp_path / "s")
    assert not checks[0].passed and "cannot decode" in checks[0].problems[0]


@pytest.mark.parametrize("codec", ["jp2", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_decode_checks_size_and_pixel_count_first(monkeypatch, codec, channels):
    needs(f"files-{codec}")
    image = np.random.default_rng(3).integers(0, 256, (20, 30, channels), np.uint8)
    data = codecs.encode(image, codec, {})
    np.testing.assert_array_equal(codecs.decode(data, channels, (20, 30)), image)
    out = np.empty_like(image)
    codecs.decode_into(data, out)
    np.testing.assert_array_equal(out, image)
    with pytest.raises(codecs.BadImage, match="the image is 20x30, 30x20 expected"):
        codecs.decode(data, channels, (30, 20))
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused at 200: this one has 600
    with pytest.raises(codecs.BadImage, match="600 pixels, over the limit of 200"):
        codecs.decode(data, channels, (20, 30))


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("files-jp2", ["--jp2-rate", "0.5"], "jp2_rate=0.5 must be a compression ratio over 1"),
        ("files-webp", ["--webp-quality", "101"], "webp_quality=101 must be 1..100"),
    ],
)
def test_bad_options_are_one_clear_error_from_the_cli(tmp_path, name, args, message):
    done = run("convert", "digits", "-f", name, "-o", tmp_path / "s", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{name} option {message}" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"jp2_rate": "ten"}, "jp2_rate='ten' is not a float"),
        ({"jp2_rate": 1}, "jp2_rate=1 must be a compression ratio over 1"),
        ({"jp2_rate": float("nan")}, "jp2_rate=nan must be a compression ratio over 1"),
        ({"webp_quality": 0}, "webp_quality=0 must be >= 1"),
        ({"webp_quality": 1000}, "webp_quality=1000 must be 1..100"),
    ],
)
def test_bad_options_from_python_name_the_format_and_option(tmp_path, options, message):
    name = "files-jp2" if "jp2_rate" in options else "files-webp"
    with pytest.raises(LoadbenchError, match=f"^{name} option {message}"):
        loadbench.convert("digits", name, tmp_path / "s", **options)
    assert not (tmp_path / "s").exists()


def test_both_are_in_format_all_and_lossless_by_default():
    assert {"files-jp2", "files-webp"} <= set(expand_names(["all"]))
    for name, lossy in LOSSY.items():
        fmt = get_format(name)
        assert not fmt.is_lossy(fmt.resolve_options("uint8", {}))
        assert fmt.is_lossy(fmt.resolve_options("uint8", lossy))


def test_a_pillow_without_the_codec_says_so(monkeypatch, tmp_path):
    from PIL import features

    monkeypatch.setattr(features, "check", lambda feature: feature != "webp")
    pillow_codecs.missing.cache_clear()
    try:
        note = get_format("files-webp").missing()
        assert note and "files-webp" in note and "libwebp" in note
        assert get_format("files-jp2").missing() is None
        with pytest.raises(LoadbenchError, match="files-webp cannot run here"):
            loadbench.convert("digits", "files-webp", tmp_path / "s")
    finally:
        pillow_codecs.missing.cache_clear()


def test_the_manifest_says_the_extension_and_a_foreign_one_is_refused(tmp_path):
    needs("files-webp")
    loadbench.convert(odd_source((8, 8, 1)), "files-webp", tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["extension"] == "webp"
    manifest["splits"]["train"]["extension"] = "gif"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadbenchError, match="damaged"):
        loadbench.open_store(tmp_path / "s").raw("train")
