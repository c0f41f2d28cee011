"""Augmentation with torchvision transforms v2, seeded per sample: sample i of epoch e is
augmented with randomness that depends only on (seed, epoch, i), so workers, access modes and
resumed runs augment every sample identically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loadbench.options import Option, as_list

AUGMENTATIONS = ("flip", "crop", "rotate", "jitter")


def _augmentations(value: Any) -> list[str]:
    names = as_list(value)
    for name in names:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS}")
    return names


AUGMENT_OPTIONS = {
    "augment": Option([], f"any of {','.join(AUGMENTATIONS)}", parse=_augmentations, shown="none"),
}


def build_augment(names: list[str], image_shape: tuple[int, int, int]):
    """torchvision transforms v2 on one (C, H, W) float image, or None for no augmentation."""
    if not names:
        return None
    from torchvision.transforms import v2

    h, w, c = image_shape
    steps = []
    if "crop" in names:
        steps.append(v2.RandomCrop((h, w), padding=max(1, min(h, w) // 8), padding_mode="reflect"))
    if "flip" in names:
        steps.append(v2.RandomHorizontalFlip())
    if "rotate" in names:
        steps.append(v2.RandomRotation(15))
    if "jitter" in names:
        # Saturation and hue need colour; grayscale images get brightness and contrast only.
        colour = {"saturation": 0.2, "hue": 0.02} if c == 3 else {}
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, **colour))
    return v2.Compose(steps)


def seeded(transform, image, seed: int, epoch: int, index: int):
    """Apply `transform` with randomness that depends only on (seed, epoch, index).

    Workers, access modes and resumed runs then augment every sample identically.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)
        return transform(image)


@dataclass
class Augmenter:
    """Who is augmented how: everyone with `augment`, oversampled copies with `copy_augment`."""

    augment: object | None
    copy_augment: object | None
    seed: int

    def __call__(self, image, position: int, copy: bool, epoch: int):
        transform = self.copy_augment if copy and self.copy_augment is not None else self.augment
        if transform is None:
            return image
        return seeded(transform, image, self.seed, epoch, position)


def augment_batch(images, keys, augmenter: Augmenter | None):
    """Each image of a batch augmented with its own key (position, index, copy, epoch)."""
    import torch

    if augmenter is None:
        return images
    return torch.stack(
        [augmenter(img, k[0], k[2], k[3]) for img, k in zip(images, keys, strict=True)]
    )
