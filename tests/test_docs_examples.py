"""The code of docs/formats.md runs as written: the convert command, then each example in a
process of its own (as the document says to run them), against the store it made."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
BIN = Path(sys.executable).parent


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    (convert,) = blocks("bash")
    args = shlex.split(convert.strip())
    assert args[0] == "loadbench"
    here = tmp_path_factory.mktemp("doc")
    done = subprocess.run([str(BIN / "loadbench"), *args[1:]], cwd=here, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return here


@pytest.mark.parametrize("which", [0, 1], ids=["pytorch", "tf-data"])
def test_the_examples_of_docs_formats_run(store_dir, which):
    code = blocks("python")[which]
    if "import tensorflow" in code and importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (pip install 'loadbench[tf]')")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=store_dir, capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Two epochs over digits' 1,437 training images in batches of 256: a last batch of 157 or
    # 158 (the store's split), printed with the shape each framework gives.
    assert [line.split()[0] for line in lines[:2]] == ["0", "1"]
    assert re.search(r"\b15\d\b", lines[1]) and "float32" in lines[1]
