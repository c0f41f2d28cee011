"""`synthetic:PRESET` — deterministic generated images that behave like photos.

Each class is a combination of a shape (disc, square, triangle, ring, cross, diamond), a colour
tone and a background style; every image draws its own position, size, rotation, lighting,
background gradient, blotches and sensor noise. So a small CNN learns the classes (they are not
noise), and the images compress with PNG/JPEG like photographs (smooth regions, soft edges,
grain), which matters when the benchmark compares image-file formats with raw arrays.

Generation is vectorised in fixed blocks keyed by (seed, split, block), so any subset or order
of indices gives the same pixels.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.sources import register_source
from loadbench.sources.raw import RawDataset, RawSplit


@dataclass(frozen=True)
class Preset:
    size: int
    channels: int
    classes: int
    count: int
    eval_count: int
    eval_split: str
    about: str


PRESETS = {
    "cifar-like": Preset(
        32, 3, 10, 50_000, 10_000, "test", "CIFAR-10's shape: 32x32x3, 10 classes"
    ),
    "mnist-like": Preset(28, 1, 10, 60_000, 10_000, "test", "MNIST's shape: 28x28x1, 10 classes"),
    "tinyimagenet-like": Preset(
        64, 3, 200, 100_000, 10_000, "val", "Tiny ImageNet's shape: 64x64x3, 200 classes"
    ),
    "masks-like": Preset(
        512, 3, 2, 1_000, 200, "test", "the face-mask photos' shape: 512x512x3, 2 classes"
    ),
}

N_SHAPES = 6
N_TONES = 12
_SPLIT_IDS = {"train": 0, "test": 1, "val": 2}


SYNTHETIC_OPTIONS = {
    "count": Option(None, "training images", kind=int, above=0, shown="the preset's"),
    "eval_count": Option(
        None, "test (val for tinyimagenet-like) images", kind=int, minimum=0, shown="the preset's"
    ),
    "size": Option(
        None, "height = width in pixels", kind=int, minimum=8, maximum=4096, shown="the preset's"
    ),
    "channels": Option(
        None,
        "1 or 3",
        kind=int,
        choices=(1, 3),
        choices_text="1 (grayscale) or 3 (RGB)",
        shown="the preset's",
    ),
    "classes": Option(
        None, "classes", kind=int, minimum=2, maximum=N_SHAPES * N_TONES * 4, shown="the preset's"
    ),
}


def block_size(height: int, width: int) -> int:
    """Images generated together: bounded memory (about 1 Mpixel per block) at any size."""
    return int(max(1, min(256, (1 << 20) // (height * width))))


class SyntheticSplit(RawSplit):
    def __init__(self, count: int, size: int, channels: int, classes: int, seed: int, split: str):
        self.size, self.channels, self.classes, self.seed = size, channels, classes, seed
        self.split_id = _SPLIT_IDS.get(split, 3)
        rng = np.random.default_rng([seed, self.split_id, 0xC1A55])
        self.labels = rng.permutation(np.arange(count) % classes).astype(np.int64)
        self.block = block_size(size, size)
        self._cache: tuple[int, np.ndarray] | None = None

    def load(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        blocks = indices // self.block
        for b in np.unique(blocks):
            where = np.flatnonzero(blocks == b)
            out[where] = self._block(int(b))[indices[where] - b * self.block]
        return out

    def _block(self, b: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == b:
            return self._cache[1]
        lo = b * self.block
        labels = self.labels[lo : lo + self.block]
        rng = np.random.default_rng([self.seed, self.split_id, b])
        with _one_blas_thread():
            images = render(labels, self.size, self.channels, self.classes, rng)
        self._cache = (b, images)
        return images


_BLAS = None  # threadpoolctl's controller, made on first use


def _one_blas_thread():
    """NumPy's BLAS on one thread, for `render`. With more threads OpenBLAS sums some of its
    products in another order, and a rare pixel came out one level apart (1 of 610
    tinyimagenet-like images, 1 vs 2 threads): the data would depend on the machine's cores,
    and on `convert --jobs`. One thread is also twice as fast here for these small products
    (on 2 cores), and leaves the other cores to the conversion's worker processes."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _class_attributes(classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Shape, tone and background style of every class.

    (shape, tone, style) is unique per class. Up to 12 classes every class has a colour of its
    own; beyond, classes that share a shape differ in colour and those sharing a colour in shape.
    """
    n_tones = min(N_TONES, classes)
    k = np.arange(classes)
    shape = k % N_SHAPES
    tone = k % n_tones if classes <= N_TONES else (k // N_SHAPES) % N_TONES
    style = k // (N_SHAPES * N_TONES)
    return shape, tone, style, n_tones


def _tone_rgb(tone: np.ndarray, n_tones: int) -> np.ndarray:
    """Distinct hues whose brightness also differs, so grayscale classes stay apart."""
    rgb = []
    for t in tone:
        hue = t / n_tones
        value = 0.45 + 0.5 * ((t * 5) % n_tones) / max(n_tones - 1, 1)
        rgb.append(colorsys.hsv_to_rgb(hue, 0.75, value))
    return np.array(rgb, dtype=np.float32)


def _lowfreq(rng: np.random.Generator, n: int, size: int, grid: int, channels: int) -> np.ndarray:
    """Smooth random fields (n, size, size, channels): a coarse grid upsampled bilinearly."""
    coarse = rng.standard_normal((n, grid, grid, channels), dtype=np.float32)
    pos = np.linspace(0, grid - 1, size, dtype=np.float32)
    lo = np.minimum(pos.astype(np.int64), grid - 2)
    frac = pos - lo
    interp = np.zeros((size, grid), dtype=np.float32)
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    return np.einsum("hi,nijc,wj->nhwc", interp, coarse, interp, optimize=True)


def _signed_distance(shape_id: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray):
    """Signed distance (negative inside) of each image's shape, in normalised coordinates."""
    au, av = np.abs(u), np.abs(v)
    radial = np.sqrt(u * u + v * v)
    candidates = [
        radial - r,  # disc
        np.maximum(au, av) - 0.85 * r,  # square
        np.maximum(-v - 0.5 * r, 0.5 * v + 0.866 * au - 0.5 * r),  # triangle
        np.abs(radial - 0.75 * r) - 0.25 * r,  # ring
        np.minimum(  # cross
            np.maximum(au - 0.3 * r, av - r), np.maximum(au - r, av - 0.3 * r)
        ),
        au + av - 1.1 * r,  # diamond
    ]
    stacked = np.stack(candidates)  # (shapes, n, H, W)
    return np.take_along_axis(stacked, shape_id[None, :, None, None], axis=0)[0]


def render(
    labels: np.ndarray, size: int, channels: int, classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw one image per label: uint8 (n, size, size, channels)."""
    n = len(labels)
    shape_of, tone_of, style_of, n_tones = _class_attributes(classes)
    shape_id, style = shape_of[labels], style_of[labels]
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")

    def per_image(low, high):
        return rng.uniform(low, high, n).astype(np.float32)[:, None, None]

    # Background: a gradient between two muted colours, blotches, and stripes for some styles.
    c0 = rng.uniform(0.15, 0.85, (n, 1, 1, 3)).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 0.25, (n, 1, 1, 3)), 0, 1).astype(np.float32)
    angle = per_image(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3
    background = c0 + (c1 - c0) * ramp[..., None]
    background += 0.07 * _lowfreq(rng, n, size, 5, 3)
    frequency = per_image(6, 14)
    striped = np.flatnonzero(style % 2 == 1)  # only classes whose style has them pay for them
    if len(striped):
        phase = (np.cos(angle) * yy - np.sin(angle) * xx)[striped]
        background[striped] += 0.08 * np.sin(frequency[striped] * phase * np.pi)[..., None]
    blotchy = np.flatnonzero(style >= 2)
    if len(blotchy):
        background[blotchy] += 0.12 * _lowfreq(rng, len(blotchy), size, 9, 3)

    # Object: the class's shape and tone, placed, scaled and rotated at random, lit from a side.
    cx, cy = per_image(-0.3, 0.3), per_image(-0.3, 0.3)
    radius = per_image(0.35, 0.6)
    theta = per_image(-0.5, 0.5)
    u = np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)
    v = -np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)
    distance = _signed_distance(shape_id, u, v, radius)
    edge = 1.5 * 2 / size  # about one and a half pixels of soft edge, like a lens
    alpha = np.clip(0.5 - distance / edge, 0, 1)[..., None]
    tone = _tone_rgb(tone_of[labels], n_tones)[:, None, None, :]
    tone = np.clip(tone + rng.normal(0, 0.04, (n, 1, 1, 3)), 0, 1).astype(np.float32)
    light = 1 + 0.3 * (per_image(-1, 1) * u + per_image(-1, 1) * v)
    obj = tone * light[..., None] + 0.04 * _lowfreq(rng, n, size, 7, 3)
    image = background * (1 - alpha) + obj * alpha

    image += np.float32(0.012) * rng.standard_normal(image.shape, dtype=np.float32)  # grain
    if channels == 1:
        image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = image[..., None]
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


@register_source(
    "synthetic",
    options=SYNTHETIC_OPTIONS,
    arg="PRESET",
    arg_required=False,
    arg_is_path=False,
    summary="generated photo-like images: " + ", ".join(PRESETS) + " (default cifar-like)",
)
def open_synthetic(arg: str | None, opts) -> RawDataset:
    name = arg or "cifar-like"
    if name not in PRESETS:
        raise LoadbenchError(f"unknown synthetic preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    size = opts.size or p.size
    channels = opts.channels or p.channels
    classes = opts.classes or p.classes
    counts = {"train": opts.count or p.count}
    eval_count = p.eval_count if opts.eval_count is None else opts.eval_count
    if eval_count:
        counts[p.eval_split] = eval_count
    splits = {
        s: SyntheticSplit(n, size, channels, classes, opts.seed, s) for s, n in counts.items()
    }
    shape_names = ["disc", "square", "triangle", "ring", "cross", "diamond"]
    shape_of, tone_of, style_of, _ = _class_attributes(classes)
    class_names = [
        f"{shape_names[s]}-t{t}" + (f"-b{b}" if b else "")
        for s, t, b in zip(shape_of, tone_of, style_of, strict=True)
    ]
    return RawDataset(
        classes=class_names,
        image_shape=(size, size, channels),
        splits=splits,
        details={"preset": name, "about": p.about},
    )
