"""The generated sources: deterministic, photo-like, and learnable by a small CNN."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import loadbench
from loadbench.sources.synthetic import PRESETS


def png_ratio(images: np.ndarray) -> float:
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze()).save(buffer, "PNG")
        sizes.append(len(buffer.getvalue()))
    return float(np.mean(sizes)) / images[0].nbytes


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_have_the_shapes_of_the_datasets_they_stand_for(preset):
    p = PRESETS[preset]
    source = loadbench.load_source(f"synthetic:{preset}?count=4&eval_count=2")
    assert source.image_shape == (p.size, p.size, p.channels)
    assert len(source.classes) == p.classes == len(set(source.classes))
    assert source.splits == ["train", p.eval_split]
    images, labels = source.split("train")
    assert images.shape == (4, p.size, p.size, p.channels) and images.dtype == np.uint8


def test_default_counts_are_the_real_datasets():
    source = loadbench.load_source("synthetic:tinyimagenet-like")
    assert (source.count("train"), source.count("val")) == (100_000, 10_000)
    assert np.bincount(source.labels("train")).tolist() == [500] * 200


def test_same_spec_same_pixels_in_any_order():
    a = loadbench.load_source("synthetic:cifar-like?count=600&eval_count=0")
    b = loadbench.load_source("synthetic:cifar-like?count=600&eval_count=0")
    images, labels = a.split("train")
    np.testing.assert_array_equal(images, b.split("train")[0])
    picked = np.array([599, 3, 300, 3])
    raw = b._get("train").raw
    np.testing.assert_array_equal(raw.load(picked), images[picked])
    other = loadbench.load_source("synthetic:cifar-like?count=600&eval_count=0&seed=1")
    assert not np.array_equal(other.split("train")[0], images)


def test_images_compress_like_photos_not_like_noise():
    images, _ = loadbench.load_source("synthetic:cifar-like?count=200&eval_count=0").split("train")
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert 0.3 < png_ratio(images) < 0.85
    assert png_ratio(noise) > 1.0
    assert 20 < images.std() < 100  # neither flat nor saturated


def test_grayscale_classes_stay_apart():
    source = loadbench.load_source("synthetic:mnist-like?count=400&eval_count=0&size=16")
    images, labels = source.split("train")
    assert images.shape[1:] == (16, 16, 1)
    means = [images[labels == c].mean() for c in range(10)]
    assert np.std(means) > 3


def test_a_small_cnn_learns_the_classes_well_above_chance():
    torch.manual_seed(0)
    source = loadbench.load_source("synthetic:cifar-like?count=1500&eval_count=300&size=24")
    x, y = source.split("train")
    xt, yt = source.split("test")

    def tensors(images, labels):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)

    x, y = tensors(x, y)
    xt, yt = tensors(xt, yt)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, xt = (x - mean) / std, (xt - mean) / std

    def block(cin, cout):
        return [
            torch.nn.Conv2d(cin, cout, 3, padding=1),
            torch.nn.BatchNorm2d(cout),
            torch.nn.ReLU(),
        ]

    model = torch.nn.Sequential(
        *block(3, 16), torch.nn.MaxPool2d(2), *block(16, 32), torch.nn.MaxPool2d(2), *block(32, 32),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1; about 0.8 after these 8 epochs


def test_bad_synthetic_options():
    with pytest.raises(loadbench.LoadbenchError, match="unknown synthetic preset 'imagenet'"):
        loadbench.load_source("synthetic:imagenet")
    with pytest.raises(loadbench.LoadbenchError, match="option 'channels'"):
        loadbench.load_source("synthetic:cifar-like?channels=2")
    with pytest.raises(loadbench.LoadbenchError, match="unknown option 'colour'"):
        loadbench.load_source("synthetic", colour="red")
