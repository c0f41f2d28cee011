"""End to end at the study's scale: CIFAR-10's shape, every format, every image verified.

Run with `make test-slow` (a few minutes on 2 cores); kept out of `make test`.
"""

from __future__ import annotations

import pytest

import loadbench
from loadbench.conversion import convert_many
from loadbench.verify import verify_path


@pytest.mark.slow
def test_cifar_sized_dataset_in_every_format_verifies(tmp_path):
    source = loadbench.load_source("synthetic:cifar-like")
    results = convert_many(source, "all", tmp_path)
    assert all(r.store is not None for r in results)
    assert {r.store.manifest.splits["train"].count for r in results} == {50_000}
    checks = verify_path(tmp_path, source)
    assert len(checks) == 18
    assert [c.problems for c in checks if not c.passed] == []
    jpeg = [c for c in checks if c.format == "files-jpeg"]
    assert all(c.psnr_db > 33 for c in jpeg)
    assert all(c.exact_images == c.count for c in checks if c.format != "files-jpeg")
