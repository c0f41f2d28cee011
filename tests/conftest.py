"""Shared fixtures: tiny deterministic sources that every format test can convert quickly."""

from __future__ import annotations

import numpy as np
import pytest

import loadbench
from loadbench.formats import FORMAT_NAMES, get_format


@pytest.fixture(scope="session")
def rgb_source():
    """40 train + 12 test images, 12x10x3, 4 classes: odd sizes catch layout mistakes."""
    return loadbench.load_source("synthetic:cifar-like?count=40&eval_count=12&size=12&classes=4")


@pytest.fixture(scope="session")
def gray_source():
    rng = np.random.default_rng(7)
    train = rng.integers(0, 256, (9, 7, 5), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 7, 5), dtype=np.uint8)
    return loadbench.sources.from_arrays(
        {"train": (train, np.arange(9) % 3), "test": (test, [2, 0, 1])}, classes=["a", "b", "c"]
    )


def valid_combinations():
    """Every (format, dtype) a store can be made of: the registry decides, not this list. A
    format this machine cannot run (`Format.missing()`: a Pillow without WebP) skips, saying why."""
    return [
        pytest.param(name, dtype, id=f"{name}-{dtype}", marks=_skip_if_missing(name))
        for name in FORMAT_NAMES
        for dtype in get_format(name).dtypes
    ]


def _skip_if_missing(name: str) -> tuple:
    note = get_format(name).missing()
    return (pytest.mark.skip(reason=note),) if note else ()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="session")
def stores(tmp_path_factory, rgb_source):
    """One store of `rgb_source` per valid (format, dtype), converted once per session."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for param in valid_combinations():
        name, dtype = param.values
        if param.marks:  # skipped: the format cannot run here
            continue
        made[name, dtype] = loadbench.convert(rgb_source, name, root / f"{name}-{dtype}", dtype)
    return made


# Known defect (issue 18's closing note): after a process has used array_record's writer, or a
# reader on its process-wide thread pool, a child forked from it that uses array_record crashes
# with SIGSEGV (19 of 20 forks in a minimal script). The fork tests of the formats built on it
# hit this when earlier tests of the same process wrote or read such stores; they are marked so
# that the rest of the suite is not red by chance, and still run.
ARRAY_RECORD_FORK = pytest.mark.xfail(
    reason="array_record: a fork after its writer or thread pool was used may crash (SIGSEGV)",
    strict=False,
)


def fork_marks(name: str) -> list:
    """The marks of a fork test for format `name` (see ARRAY_RECORD_FORK)."""
    return [ARRAY_RECORD_FORK] if name in ("arrayrecord", "grain") else []
