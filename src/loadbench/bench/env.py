"""What machine and software a result comes from (`env.json`), without starting CUDA."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from typing import Any

import psutil


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def filesystem_of(path: str) -> dict[str, str] | None:
    """The mount (device, mount point, type) that holds `path`."""
    path = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) > len(best.mountpoint)):
            best = part
    if best is None:
        return None
    return {"device": best.device, "mountpoint": best.mountpoint, "type": best.fstype}


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_dirty() -> bool | None:
    """Whether loadbench's checkout has uncommitted changes to tracked files (then the commit
    alone does not say what code ran); None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


# The libraries a result depends on besides torch and numpy (pip names): the formats' storage
# libraries, the peer loaders', the decoders and what the report computes with.
LIBRARIES = (
    "torchvision", "pillow", "h5py", "zarr", "numcodecs", "lmdb", "webdataset", "tfrecord",
    "protobuf", "array-record", "pyarrow", "fsspec", "s3fs", "datasets", "litdata",
    "tensorflow-cpu", "tensorflow", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "spdl", "grain",
    "streaming-community", "mosaicml-streaming", "ffcv", "pandas", "scipy", "nvidia-ml-py",
)  # fmt: skip


def library_versions() -> dict[str, str | None]:
    """The installed version of each of `LIBRARIES` (None: not installed), read from the
    packages' metadata: importing h5py, zarr or datasets would take seconds."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_info() -> list[dict[str, Any]]:
    """Name and memory of every NVIDIA GPU, from NVML (no CUDA context is created)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_bytes": int(memory.total),
                "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            })  # fmt: skip
        return gpus
    except Exception:  # no NVML library, no driver, no GPU
        return []


def gpu_free_bytes(index: int = 0) -> int | None:
    """Free memory of GPU `index` from NVML, or None without one (no CUDA context is made)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
    except Exception:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def environment(stores_dir: str | None = None) -> dict[str, Any]:
    import numpy
    import torch

    from loadbench.version import __version__

    memory = psutil.virtual_memory()
    return {
        "loadbench": __version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "libraries": library_versions(),
        "os": f"{platform.system()} {platform.release()}",
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": memory.total,
        "gpus": gpu_info(),
        "stores_filesystem": filesystem_of(stores_dir) if stores_dir else None,
    }
