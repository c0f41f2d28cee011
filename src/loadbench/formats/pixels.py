"""Pixels as stored and as a model receives them: the storage dtypes and the conversions
between them (uint8 pixels, or floats scaled to [0, 1]; float32 N,C,H,W tensors for models)."""

from __future__ import annotations

import numpy as np

DTYPES: dict[str, type[np.generic]] = {
    "uint8": np.uint8,
    "float16": np.float16,
    "float32": np.float32,
}


def to_stored(images: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 pixels -> the storage dtype: unchanged for uint8, scaled to [0, 1] for floats."""
    if dtype == "uint8":
        return images
    # Divide in float32 first so float16 and float32 stores hold the same rounded values of k/255.
    return (images.astype(np.float32) / np.float32(255)).astype(DTYPES[dtype])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Stored pixels -> uint8, inverting `to_stored` exactly for float16 and float32."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images.astype(np.float32) * 255), 0, 255).astype(np.uint8)


def to_tensor(images):
    """Stored (N, H, W, C) or (H, W, C) pixels -> float32 tensor (N, C, H, W) in [0, 1].

    Converts once per batch: uint8 is scaled on the way, float16 widened, float32 only permuted.
    """
    import torch

    if not isinstance(images, torch.Tensor):
        images = np.ascontiguousarray(images)
        if not images.flags.writeable:  # PIL and memory maps hand out read-only arrays
            images = images.copy()
        images = torch.from_numpy(images)
    t = images
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)
    if t.dtype == torch.uint8:  # one pass: reads uint8, writes contiguous float32 (N)CHW
        return torch.div(t, 255, out=torch.empty(t.shape, dtype=torch.float32, device=t.device))
    return t.float().contiguous()
