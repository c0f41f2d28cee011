"""`tensor` — the whole split resident on the training device (CUDA when present, else CPU).

On disk it is the same pair of `.npy` files as `npy`; the difference is how it is read: loaded
once, whole, onto the device and indexed there (airbench's loader, the modern form of the
study's "CuPy mmap"). When CUDA and CuPy are both present the arrays are read by CuPy and handed
to PyTorch zero-copy through DLPack. Inside DataLoader worker processes, where CUDA cannot be
used, the split is held in CPU memory instead.
"""

from __future__ import annotations

import io

import numpy as np

from loadbench.formats.base import Format, SplitReader, register_format
from loadbench.formats.npy import NpyWriter, check_arrays
from loadbench.formats.pixels import to_tensor
from loadbench.storefiles import NPY_ERRORS


def choose_device(requested: str | None = None) -> str:
    """`cuda` when available and usable in this process, else `cpu`; an explicit choice wins."""
    if requested not in (None, "auto"):
        return requested
    import torch
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        return "cpu"  # CUDA cannot be initialised in a forked DataLoader worker
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_resident(path, device: str):
    """A whole `.npy` file (a path or a file object) as a tensor on `device` (CuPy + DLPack
    when both are there)."""
    import torch

    if device.startswith("cuda"):
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            with cupy.cuda.Device(torch.device(device).index or 0):
                return torch.from_dlpack(cupy.load(path))
        return torch.from_numpy(np.load(path)).to(device)
    return torch.from_numpy(np.load(path))


class TensorReader(SplitReader):
    device: str | None = None  # set by the store; None = choose at open

    def _open(self):
        device = choose_device(self.device)
        names = f"{self.split}_images.npy", f"{self.split}_labels.npy"
        headers = []
        for name in names:  # checked before a byte is loaded: a damaged header sizes the load
            try:
                headers.append(self.files.check_npy(name)[:3])  # shape, dtype, fortran
            except NPY_ERRORS as e:
                raise self._damaged(f"{name} cannot be loaded", e) from None
        check_arrays(self, names, *headers)
        arrays = []
        for name in names:
            try:
                arrays.append(load_resident(self._npy(name), device))
            except NPY_ERRORS as e:
                raise self._damaged(f"{name} cannot be loaded", e) from None
        images, labels = arrays
        return {"images": images, "labels": labels, "device": images.device}

    def _npy(self, rel: str):
        """A path, or for a store on object storage read in place, the file's bytes."""
        if self.files.has_local_files:
            return self.files.local_path(rel)
        return io.BytesIO(self.files.read(rel))

    def labels(self) -> np.ndarray:
        return self.handle["labels"].cpu().numpy().astype(np.int64)

    def read_items(self, indices):
        import torch

        h = self.handle
        index = torch.as_tensor(indices, dtype=torch.long, device=h["device"])
        return h["images"][index].cpu().numpy(), h["labels"][index].cpu().numpy()

    def resident(self, device):
        """The split as this reader loads it: straight onto `device` (through CuPy there)."""
        self.device = str(device)
        return self.handle["images"], self.handle["labels"]

    def read_batch_tensor(self, indices, out=None):
        """(float32 N,C,H,W in [0, 1], int64 N) on the device, without leaving it; with `out`
        (a float32 tensor of the batch's shape), the images are copied into it.

        Indices already on the device (a permutation drawn there) are used as they are; others
        are checked on the host first, because an out-of-range index on CUDA is a device-side
        assert that kills the process, not an IndexError.
        """
        import torch

        h = self.handle
        if isinstance(indices, torch.Tensor) and indices.device == h["device"]:
            index = indices.long()
        else:
            index = torch.as_tensor(self.check_indices(indices), device=h["device"])
        images = to_tensor(h["images"][index])
        if out is not None:
            if out.shape != images.shape or out.dtype != images.dtype:
                raise ValueError(f"out must be a float32 tensor of shape {tuple(images.shape)}")
            images = out.copy_(images)
        return images, h["labels"][index]


@register_format
class TensorFormat(Format):
    name = "tensor"
    summary = "whole split resident on the device (CUDA if present; CuPy+DLPack if installed)"
    writer_class = NpyWriter
    reader_class = TensorReader
