"""Batched, seeded augmentation: the batched path is the per-image path, parameters depend on the
key alone, and each op is torchvision's op with the same parameter."""

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from loadbench.training.augment import (
    AUGMENTATIONS,
    Augmenter,
    apply,
    augment_batch,
    build_augment,
    key_uniforms,
)

OPS = [[name] for name in AUGMENTATIONS] + [list(AUGMENTATIONS)]


def images(n: int, c: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Float images as the loaders make them: uint8 pixels / 255."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8) / 255


def augmenter(names, c: int, size: int = 32, seed: int = 1, copies=("flip", "rotate")):
    shape = (size, size, c)
    copy = build_augment(sorted(set(names) | set(copies)), shape) if copies else None
    return Augmenter(build_augment(names, shape), copy, seed=seed)


def one_by_one(aug, batch, positions, copies, epoch):
    return torch.stack([aug(image, int(p), bool(k), epoch)
                        for image, p, k in zip(batch, positions, copies, strict=True)])  # fmt: skip


@pytest.mark.parametrize("names", OPS, ids="+".join)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_a_batch_is_augmented_bit_for_bit_as_its_images_one_by_one(names, c, n):
    aug = augmenter(names, c)
    batch, positions, copies = images(n, c), np.arange(40, 40 + n), np.arange(n) % 3 == 1
    together = aug.batch(batch, positions, copies, 2)
    assert together.shape == batch.shape and together.is_contiguous()
    assert torch.equal(together, one_by_one(aug, batch, positions, copies, 2))
    assert n == 1 or not torch.equal(together, batch)


def test_large_images_are_bit_for_bit_too():
    # A one-image sum of > 32k values is split across threads; the contrast mean avoids that.
    aug = augmenter(list(AUGMENTATIONS), 3, size=190)
    batch, positions, copies = images(3, 3, size=190), np.arange(3), np.zeros(3, dtype=bool)
    assert torch.equal(aug.batch(batch, positions, copies, 0),
                       one_by_one(aug, batch, positions, copies, 0))  # fmt: skip


def test_a_sample_is_augmented_alike_in_any_batch():
    aug = augmenter(list(AUGMENTATIONS), 3)
    batch, positions, copies = images(12, 3), np.arange(12) * 7, np.arange(12) % 4 == 0
    reference = aug.batch(batch, positions, copies, 3)
    shuffled = np.random.default_rng(0).permutation(12)
    again = aug.batch(batch[shuffled], positions[shuffled], copies[shuffled], 3)
    assert torch.equal(again, reference[shuffled])
    halves = [aug.batch(batch[s], positions[s], copies[s], 3) for s in (slice(0, 5), slice(5, 12))]
    assert torch.equal(torch.cat(halves), reference)


def test_the_same_key_gives_the_same_augmentation_another_seed_or_epoch_another():
    aug = augmenter(list(AUGMENTATIONS), 3)
    batch, positions, copies = images(8, 3), np.arange(8), np.zeros(8, dtype=bool)
    first = aug.batch(batch, positions, copies, 1)
    assert torch.equal(aug.batch(batch, positions, copies, 1), first)
    later = aug.batch(batch, positions, copies, 2)
    reseeded = augmenter(list(AUGMENTATIONS), 3, seed=2).batch(batch, positions, copies, 1)
    for other in (later, reseeded):
        assert all(not torch.equal(a, b) for a, b in zip(other, first, strict=True))


def test_augment_batch_is_one_batched_call_on_sampler_keys():
    aug = augmenter(["crop", "flip"], 3)
    batch = images(6, 3)
    keys = [(p, 100 + p, p % 2 == 0, 4) for p in range(6)]  # (position, index, copy, epoch)
    expected = aug.batch(batch, np.arange(6), np.arange(6) % 2 == 0, 4)
    assert torch.equal(augment_batch(batch, keys, aug), expected)
    assert augment_batch(batch, keys, None) is batch


def test_copies_are_flipped_and_rotated_the_others_only_cropped():
    aug = augmenter(["crop"], 3)
    positions, copies = np.arange(64), np.arange(64) % 2 == 1
    params = aug.params(positions, copies, 0, (3, 32, 32))
    assert params.crop.all() and (params.rotate == copies).all() and not params.jitter.any()
    assert not params.flip[~copies].any() and 0 < params.flip[copies].sum() < 32
    batch = images(64, 3)
    crop_only = Augmenter(build_augment(["crop"], (32, 32, 3)), None, seed=1)
    out = aug.batch(batch, positions, copies, 0)
    assert torch.equal(out[~copies], crop_only.batch(batch, positions, copies, 0)[~copies])


def test_key_uniforms_are_uniform_and_their_streams_independent():
    u = key_uniforms(0, 0, np.arange(20_000), 8)
    assert u.shape == (20_000, 8) and u.min() >= 0 and u.max() < 1
    assert np.allclose(u.mean(axis=0), 0.5, atol=0.01)
    correlations = np.corrcoef(u.T) - np.eye(8)
    assert np.abs(correlations).max() < 0.03
    assert not np.array_equal(u, key_uniforms(0, 1, np.arange(20_000), 8))


# -- each op is torchvision's, given the same parameter -----------------------------------------


def only(names, c: int, n: int = 16):
    """A batch, its augmenter for `names` and the drawn parameters."""
    aug = Augmenter(build_augment(names, (32, 32, c)), None, seed=3)
    batch = images(n, c, seed=c)
    return batch, aug.params(np.arange(n), np.zeros(n, dtype=bool), 0, (c, 32, 32))


@pytest.mark.parametrize("c", [1, 3])
def test_crop_is_torchvisions_crop_of_the_reflect_padded_image(c):
    batch, params = only(["crop"], c)
    out = apply(batch, params)
    assert params.pad == 4 and len(set(params.top.tolist())) > 3
    for k, image in enumerate(batch):
        padded = F.pad(image, [params.pad], padding_mode="reflect")
        expected = F.crop(padded, int(params.top[k]), int(params.left[k]), 32, 32)
        assert torch.equal(out[k], expected)


def test_flip_is_torchvisions_horizontal_flip_for_half_the_samples():
    batch, params = only(["flip"], 3, n=64)
    out = apply(batch, params)
    assert 16 < params.flip.sum() < 48
    for k, image in enumerate(batch):
        assert torch.equal(out[k], F.horizontal_flip(image) if params.flip[k] else image)


@pytest.mark.parametrize("c", [1, 3])
def test_rotate_is_torchvisions_nearest_rotation(c):
    batch, params = only(["rotate"], c)
    out = apply(batch, params)
    assert params.rotate.all() and -15 <= params.angle.min() < -5 and 5 < params.angle.max() <= 15
    for k, image in enumerate(batch):
        expected = F.rotate(image, float(params.angle[k]), InterpolationMode.NEAREST)
        # The sampling grid is computed without torchvision's matmul: a pixel exactly between
        # two source pixels may round the other way.
        assert (out[k] == expected).float().mean() >= 0.99


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
@pytest.mark.parametrize("c", [1, 3])
def test_each_jitter_op_is_torchvisions_adjust(op, c):
    batch, params = only(["jitter"], c)
    neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    alone = {name: np.full(16, value) for name, value in neutral.items() if name != op}
    out = apply(batch, dataclasses.replace(params, **alone))
    adjust = getattr(F, f"adjust_{op}")
    factors = getattr(params, op).astype(np.float32)
    expected = torch.stack([adjust(x, float(f)) for x, f in zip(batch, factors, strict=True)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert not torch.equal(out, batch) or (c == 1 and op in ("saturation", "hue"))
    if c == 3:
        low, high = (-0.02, 0.02) if op == "hue" else (0.8, 1.2)
        assert low <= factors.min() < factors.max() <= high
