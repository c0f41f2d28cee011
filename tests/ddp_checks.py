"""Two-rank `torchrun -m loadbench` runs and what they must leave, shared by the CPU (Gloo)
tests of test_distributed.py and the GPU (NCCL, Gloo on CUDA) tests of test_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from loadbench.training.checkpoint import load_model
from loadbench.training.distributed import model_digest


def torchrun(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m loadbench ARGS`, its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "loadbench", *map(str, args)]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def assert_one_model(run_dir, backend: str, test_images: int) -> dict:
    """The two ranks ended with identical weights over `backend`, model.pt (rank 0's) is that
    model, and the test split was evaluated once, every image; returns metrics.json."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    replicas = metrics["distributed"]
    assert replicas["world_size"] == 2 and replicas["backend"] == backend
    assert replicas["identical"] and len(set(replicas["model_sha256"])) == 1
    model, _ = load_model(str(run_dir / "model.pt"))
    assert model_digest(model) == replicas["model_sha256"][0]
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == test_images
    return metrics
