"""Augmentation of whole batches on their own device, seeded per sample.

Sample i of epoch e is augmented with parameters drawn from (seed, e, i) by a counter-based hash
on the host, so workers, access modes, batch sizes and resumed runs augment every sample
identically; the ops then run on the whole batch as tensor ops (no per-sample Python), which
`device` access needs to keep its batches on the GPU. A single image is a batch of one.

The ops are torchvision transforms v2's, with the same parameters and formulas: RandomCrop with
reflect padding, RandomHorizontalFlip, RandomRotation(15) (NEAREST, fill 0) and ColorJitter
(brightness, contrast, saturation 0.2, hue 0.02). One difference: ColorJitter applies its four
ops in a random order per image; here the order is fixed (brightness, contrast, saturation, hue).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadbench.options import Option, as_list

AUGMENTATIONS = ("flip", "crop", "rotate", "jitter")
MAX_DEGREES = 15.0
JITTER = 0.2  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
MAX_HUE = 0.02


def _augmentations(value: Any) -> list[str]:
    names = as_list(value)
    for name in names:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS}")
    return names


AUGMENT_OPTIONS = {
    "augment": Option([], f"any of {','.join(AUGMENTATIONS)}", parse=_augmentations, shown="none"),
}


@dataclass(frozen=True)
class Augment:
    """Which augmentations a group of samples gets, for images of one shape."""

    names: frozenset[str]
    pad: int  # crop: reflect padding on each side before cropping back to the image size


def build_augment(names: list[str], image_shape: tuple[int, int, int]) -> Augment | None:
    """The augmentations `names` for (H, W, C) images, or None for no augmentation."""
    if not names:
        return None
    h, w, _ = image_shape
    return Augment(frozenset(_augmentations(names)), pad=max(1, min(h, w) // 8))


# -- per-sample parameters: a counter-based hash of (seed, epoch, position) ----------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
STREAMS = ("top", "left", "flip", "angle", "brightness", "contrast", "saturation", "hue")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 in which every output bit depends on every
    input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_uniforms(seed: int, epochs, positions, streams: int) -> np.ndarray:
    """(N, streams) uniforms in [0, 1): column j is stream j of key (seed, epoch, position).

    Stateless (splitmix64 from a state hashed from the key), so a sample's draws do not depend on
    which other samples share its batch, or in which process it is drawn.
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1).astype(np.uint64)
    epochs = np.broadcast_to(np.asarray(epochs, dtype=np.int64), positions.shape)
    state = _mix(np.full(positions.shape, seed, dtype=np.int64).astype(np.uint64) + _GOLDEN)
    state = _mix(_mix(state ^ epochs.astype(np.uint64)) ^ positions)
    steps = _GOLDEN * np.arange(1, streams + 1, dtype=np.uint64)
    bits = _mix(state[:, None] + steps)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 bits: exact in float64


@dataclass
class AugmentParams:
    """Per-sample parameters of one batch, on the host (one row per sample). An op a sample
    does not get has a neutral parameter (crop at the centre, no flip) or a False mask."""

    crop: np.ndarray  # bool
    top: np.ndarray  # crop offsets into the image reflect-padded by `pad` on each side
    left: np.ndarray
    pad: int
    flip: np.ndarray  # bool
    rotate: np.ndarray  # bool
    angle: np.ndarray  # degrees, counter-clockwise
    jitter: np.ndarray  # bool
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray

    def on_device(self, device) -> dict:
        """The parameters the ops need as float32 (N, 1, 1, 1) tensors: one small transfer."""
        import torch

        # As torchvision's rotate: the angle taken mod 360, its matrix built from -angle in
        # float64 and then rounded to the images' float32.
        radians = np.radians(-(self.angle % 360))
        columns = {
            "top": self.top, "left": self.left, "flip": self.flip, "rotate": self.rotate,
            "cos": np.cos(radians), "sin": np.sin(radians), "jitter": self.jitter,
            "brightness": self.brightness, "contrast": self.contrast,
            "saturation": self.saturation, "hue": self.hue,
        }  # fmt: skip
        table = np.stack([np.asarray(c, dtype=np.float32) for c in columns.values()], axis=1)
        host = torch.from_numpy(table)
        if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the GPU
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=True)[:, :, None, None, None]
        return dict(zip(columns, on_device.unbind(1), strict=True))


@dataclass
class Augmenter:
    """Who is augmented how: everyone with `augment`, oversampled copies with `copy_augment`."""

    augment: Augment | None
    copy_augment: Augment | None
    seed: int

    def __call__(self, image, position: int, copy: bool, epoch: int):
        """One (C, H, W) image: the batched path on a batch of one, so that every access mode
        augments a sample alike."""
        return self.batch(image[None], np.array([position]), np.array([copy]), epoch)[0]

    def batch(self, images, positions: np.ndarray, copies: np.ndarray, epochs):
        """A float (N, C, H, W) batch in [0, 1] augmented on its device; sample k with the key
        (seed, epochs[k] or epochs, positions[k]) and the op set of a copy if copies[k]."""
        params = self.params(positions, copies, epochs, images.shape[-3:])
        return apply(images, params)

    def params(self, positions, copies, epochs, image_shape) -> AugmentParams:
        """The parameters of samples at `positions` for (C, H, W) images, drawn on the host."""
        draw = dict(zip(STREAMS, key_uniforms(self.seed, epochs, positions, len(STREAMS)).T,
                        strict=True))  # fmt: skip
        copies = np.asarray(copies, dtype=bool).reshape(-1)
        n = len(copies)
        crop = self._enabled("crop", copies)
        pad = np.where(copies, _pad(self._copy), _pad(self.augment))
        most = int(pad.max(initial=0))  # offsets into the image padded by the largest pad
        offsets = [np.where(crop, most - pad + np.floor(draw[k] * (2 * pad + 1)), most)
                   for k in ("top", "left")]  # fmt: skip
        colour = image_shape[0] == 3  # saturation and hue need colour (torchvision's rule)
        return AugmentParams(
            crop=crop, top=offsets[0].astype(np.int64), left=offsets[1].astype(np.int64),
            pad=most, flip=self._enabled("flip", copies) & (draw["flip"] < 0.5),
            rotate=self._enabled("rotate", copies),
            angle=MAX_DEGREES * (2 * draw["angle"] - 1), jitter=self._enabled("jitter", copies),
            brightness=1 + JITTER * (2 * draw["brightness"] - 1),
            contrast=1 + JITTER * (2 * draw["contrast"] - 1),
            saturation=1 + JITTER * (2 * draw["saturation"] - 1) if colour else np.ones(n),
            hue=MAX_HUE * (2 * draw["hue"] - 1) if colour else np.zeros(n),
        )  # fmt: skip

    @property
    def _copy(self) -> Augment | None:
        """What oversampled copies get: `copy_augment`, else what everyone gets."""
        return self.copy_augment if self.copy_augment is not None else self.augment

    def _enabled(self, name: str, copies: np.ndarray) -> np.ndarray:
        """Which samples get augmentation `name`."""
        return np.where(copies, _has(self._copy, name), _has(self.augment, name))


def _pad(augment: Augment | None) -> int:
    return augment.pad if _has(augment, "crop") else 0


def _has(augment: Augment | None, name: str) -> bool:
    return augment is not None and name in augment.names


def augment_batch(images, keys, augmenter: Augmenter | None):
    """A batch augmented in one call, each image with its own key (position, index, copy, epoch)."""
    if augmenter is None:
        return images
    positions, _, copies, epochs = (np.asarray(column) for column in zip(*keys, strict=True))
    return augmenter.batch(images, positions, copies, epochs)


# -- the ops, on whole batches -----------------------------------------------------------------


def apply(images, params: AugmentParams):
    """Crop, flip, rotate and jitter a float (N, C, H, W) batch in [0, 1] with `params`."""
    import torch

    p = params.on_device(images.device)
    if params.crop.any() or params.flip.any():
        images = _crop_flip(images, p["top"], p["left"], p["flip"], params.pad)
    for name, op in (("rotate", _rotate), ("jitter", _jitter)):
        mask = getattr(params, name)
        if mask.any():  # samples without the op (copies, or not copies) keep their pixels
            changed = op(images, p)
            images = changed if mask.all() else torch.where(p[name] > 0.5, changed, images)
    return images


def _crop_flip(images, top, left, flip, pad: int):
    """RandomCrop (reflect padding) and RandomHorizontalFlip as one gather: each sample's rows
    and columns start at its own offsets into the padded image, its columns reversed if it is
    flipped, and a padded index is reflected back into the image, so the padded batch is never
    made (torch's reflect pad on the CPU took 9 ms for 256 CIFAR images on 2 threads, the whole
    crop and flip of `device` access). Pure indexing, so exact."""
    import torch

    n, c, h, w = images.shape
    rows = top.reshape(n, 1, 1).long() + torch.arange(h, device=images.device).view(1, h, 1)
    columns = torch.arange(w, device=images.device).view(1, 1, w)
    columns = torch.where(flip.reshape(n, 1, 1) > 0.5, w - 1 - columns, columns)
    columns = left.reshape(n, 1, 1).long() + columns
    index = _reflect(rows - pad, h) * w + _reflect(columns - pad, w)
    return images.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view_as(images)


def _reflect(index, size: int):
    """Indices into an image padded by reflection (the edge pixel not repeated, as torch's and
    torchvision's "reflect"), given relative to the image: the image pixel each one shows."""
    import torch

    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _rotate(images, p):
    """torchvision's rotate (NEAREST, fill 0, expand False): each output pixel samples the input
    at its centre-relative coordinates turned back by the angle (torchvision's `_affine_grid`,
    computed per sample with broadcasting instead of a batched matmul)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    kw = {"device": images.device, "dtype": images.dtype}
    x = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, **kw)
    y = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, **kw).view(h, 1)
    cos, sin = p["cos"], p["sin"]
    grid_x = x * (cos / (0.5 * w)) + y * (sin / (0.5 * w))
    grid_y = x * (-sin / (0.5 * h)) + y * (cos / (0.5 * h))
    grid = torch.stack((grid_x[:, 0], grid_y[:, 0]), dim=-1)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _jitter(images, p):
    """ColorJitter with torchvision's formulas, in a fixed order: brightness (blend with black),
    contrast (with the grayscale mean), saturation (with grayscale), hue (in HSV)."""
    colour = images.shape[1] == 3
    out = images.mul(p["brightness"]).clamp_(0, 1)
    out = _blend(out, _mean(_grayscale(out) if colour else out), p["contrast"])
    if not colour:  # torchvision leaves grayscale images' saturation and hue as they are
        return out
    out = _blend(out, _grayscale(out), p["saturation"])
    return _shift_hue(out, p["hue"])


def _blend(images, other, ratio):
    return images.mul(ratio).add_(other * (1 - ratio)).clamp_(0, 1)


def _grayscale(images):
    r, g, b = images.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _mean(images):
    """The per-image mean as (N, 1, 1, 1), summed one dim at a time: a whole-image sum of a batch
    of one is split across threads (another order of additions) where a batch's is not, and the
    single-image path must give the batched path's bits."""
    _, c, h, w = images.shape
    total = images.sum(-1, keepdim=True).sum(-2, keepdim=True).sum(-3, keepdim=True)
    return total / (c * h * w)


def _shift_hue(images, shift):
    """torchvision's adjust_hue: RGB -> HSV (Pillow's conversion), hue + shift mod 1, -> RGB."""
    import torch

    r, g, _ = images.unbind(1)
    low, high = torch.aminmax(images, dim=1)
    grey = high == low  # hue and saturation are 0 there; the divisors are replaced to avoid NaN
    spread = high - low
    ones = torch.ones_like(high)
    s = spread / torch.where(grey, ones, high)
    rc, gc, bc = (
        (high.unsqueeze(1) - images) / torch.where(grey, ones, spread).unsqueeze(1)
    ).unbind(1)
    red, green = high == r, (high == g) & (high != r)
    blue = (high != r) & (high != g)
    h = (bc - gc).mul_(red).add_((rc + 2.0 - bc).mul_(green)).add_((gc + 4.0 - rc).mul_(blue))
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0).add_(shift[:, 0]).remainder_(1.0)
    h6 = h.mul_(6)
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    v = high
    q = (1.0 - s * f).mul_(v).clamp_(0.0, 1.0)
    t = (s * f).add_(1.0 - s).mul_(v).clamp_(0.0, 1.0)
    p = (1.0 - s).mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)
    select = _hsv_select(images.device)[:, sector.to(torch.int32).remainder_(6)]
    return vpqt.gather(1, select.movedim(0, 1))


@functools.cache
def _hsv_select(device):
    """For each of the 6 hue sectors, which of (v, p, q, t) is r, g and b: made on a device once."""
    import torch

    table = [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]]
    return torch.tensor(table, dtype=torch.long, device=device)
