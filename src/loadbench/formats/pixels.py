"""Pixels as stored and as a model receives them: the storage dtypes and the conversions
between them (uint8 pixels, or floats scaled to [0, 1]; float32 N,C,H,W tensors for models)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


def to_tensor(images, out=None, threads: int = 1):
    """Stored (N, H, W, C) or (H, W, C) pixels -> float32 tensor (N, C, H, W) in [0, 1].

    Converts once per batch: uint8 is scaled on the way, float16 widened, float32 only permuted.
    With `out` (a float32 tensor of the result's shape, on the CPU), the result is written there.
    With `threads` > 1, a large batch is converted in that many parts at once (`_convert`).

    Host pixels are converted by NumPy: torch's kernel splits a batch over its intra-op threads,
    which spin while they wait, and a loader's process shares the cores with its workers; on a
    busy 2-core machine that made the conversion of 256 CIFAR images 10-20x slower (20-30 ms,
    against 0.7-1.6 ms with NumPy; 2026-12-05). Both divide in float32: the same bits.
    """
    import torch

    if isinstance(images, torch.Tensor) and images.device.type != "cpu":
        return _torch_to_tensor(images, out)
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    images = np.asarray(images)
    layout = (0, 3, 1, 2) if images.ndim == 4 else (2, 0, 1)
    shape = tuple(images.shape[i] for i in layout)
    if out is None:  # NumPy's memory: it asks the kernel for huge pages, torch's does not
        out = torch.from_numpy(np.empty(shape, dtype=np.float32))  # (a 512x512 batch: 2x)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
    _convert(images.transpose(layout), out.numpy(), threads)
    return out


PARALLEL_ELEMENTS = 1 << 19  # a batch smaller than this is converted in one part
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own


def _convert(source: np.ndarray, target: np.ndarray, threads: int) -> None:
    """`target` = `source` as float32 in [0, 1], in `threads` parts along the first axis, this
    thread doing one (NumPy lets go of the GIL in the loop). 256 CIFAR images in two parts:
    1.9x faster on an idle 2-core machine."""
    parts = min(threads, len(source)) if source.ndim == 4 else 1
    if parts < 2 or source.size < PARALLEL_ELEMENTS:
        _convert_part(source, target)
        return
    bounds = [len(source) * k // parts for k in range(parts + 1)]
    pool = _thread_pool(parts - 1)
    rest = [pool.submit(_convert_part, source[a:b], target[a:b])
            for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]  # fmt: skip
    _convert_part(source[: bounds[1]], target[: bounds[1]])
    for part in rest:
        part.result()


def _convert_part(source: np.ndarray, target: np.ndarray) -> None:
    if source.dtype == np.uint8:  # one pass: reads uint8, writes contiguous float32 (N)CHW
        np.divide(source, np.float32(255), out=target)
    else:
        np.copyto(target, source, casting="same_kind")


def _thread_pool(size: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < size:
        _pool = (os.getpid(), ThreadPoolExecutor(size, thread_name_prefix="loadbench-convert"))
    return _pool[1]


def _torch_to_tensor(t, out):
    """`to_tensor` of pixels on a device, by torch there."""
    import torch

    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)
    if out is None:
        out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    if t.dtype == torch.uint8:
        return torch.div(t, 255, out=out)
    return out.copy_(t)
