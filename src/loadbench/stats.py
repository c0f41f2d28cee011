"""Per-split statistics of a source: counts, class balance, image sizes, channel mean/std.

The study asks, for every dataset, the average, min, max and median size of an image; for file
sources those are of the original files (width, height, bytes) before resizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loadbench import progress
from loadbench.sources import Source


@dataclass
class Summary:
    min: float
    mean: float
    median: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> Summary:
        values = np.asarray(values, dtype=np.float64)
        return cls(
            float(values.min()), float(values.mean()), float(np.median(values)), float(values.max())
        )


@dataclass
class SplitStats:
    split: str
    count: int
    class_counts: dict[str, int]
    image_shape: tuple[int, int, int]  # as stored: H, W, C
    stored_bytes_per_image: int
    channel_mean: list[float]  # of pixels scaled to [0, 1]
    channel_std: list[float]
    original_width: Summary | None = None
    original_height: Summary | None = None
    original_file_bytes: Summary | None = None


def source_stats(source: Source) -> list[SplitStats]:
    out = []
    channels = source.image_shape[2]
    for split in source.splits:
        labels = source.labels(split)
        counts = np.bincount(labels, minlength=len(source.classes))
        total = np.zeros(channels)
        total_sq = np.zeros(channels)
        with progress.task(f"stats {split}", source.count(split)) as advance:
            for images, _ in source.iter_batches(split):
                pixels = images.reshape(-1, channels).astype(np.float64) / 255.0
                total += pixels.sum(axis=0)
                total_sq += (pixels * pixels).sum(axis=0)
                advance(len(images))
        n = max(1, source.count(split) * source.image_shape[0] * source.image_shape[1])
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
        stats = SplitStats(
            split=split,
            count=source.count(split),
            class_counts=dict(zip(source.classes, counts.tolist(), strict=True)),
            image_shape=tuple(source.image_shape),
            stored_bytes_per_image=int(np.prod(source.image_shape)),
            channel_mean=mean.round(4).tolist(),
            channel_std=std.round(4).tolist(),
        )
        sizes = source.original_sizes(split) if source.count(split) else None
        if sizes is not None:
            stats.original_width = Summary.of(sizes.width)
            stats.original_height = Summary.of(sizes.height)
            stats.original_file_bytes = Summary.of(sizes.file_bytes)
        out.append(stats)
    return out
