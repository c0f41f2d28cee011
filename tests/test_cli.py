"""The command line as a user meets it: help with examples, results, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import loadbench
from loadbench.formats import format_names

COMMANDS = [
    "sources", "formats", "stats", "convert", "verify", "models", "train", "lr-find", "predict",
    "bench",
]  # fmt: skip


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "loadbench", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout and "loadbench " + command in result.stdout


def test_convert_then_verify_all_formats(tmp_path):
    made = run(
        "convert", "digits", "--format", "all", "--out", tmp_path / "stores", "--limit", "50"
    )
    assert made.returncode == 0, made.stderr
    for name in format_names():
        assert name in made.stdout
        assert (tmp_path / "stores" / f"{name}-uint8" / "manifest.json").is_file()
    checked = run("verify", tmp_path / "stores", "--source", "digits")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    splits = 2 * len(format_names())  # train and test of every format
    assert f"all {splits} split check(s) passed" in checked.stdout
    assert checked.stdout.count("PASS") == splits
    again = run(
        "convert", "digits", "-f", "npy", "-o", tmp_path / "stores" / "npy-uint8", "--limit", "50"
    )
    assert again.returncode == 0 and "reused" in again.stdout


def test_verify_failure_exits_non_zero(tmp_path):
    store = loadbench.convert("digits", "files-jpeg", tmp_path / "s", jpeg_quality=1)
    result = run("verify", store.path, "--source", "digits", "--psnr-min", "45")
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "under the 45 dB threshold" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["convert", "cifar10:/no/such/dir", "-f", "npy", "-o", "x"],
            "/no/such/dir does not exist",
        ),
        (["convert", "digits", "-f", "parquet", "-o", "x"], "unknown format 'parquet'"),
        (["convert", "digits", "-f", "npy", "-o", "x", "--dtype", "int4"], "unknown dtype 'int4'"),
        (
            ["convert", "digits", "-f", "files-png", "-o", "x", "--dtype", "float16"],
            "files-png stores uint8",
        ),
        (["convert", "digits", "-f", "npy", "-o", "x", "--remap", "a=11"], "unknown class '11'"),
        (["convert", "digits", "-f", "npy", "-o", "x", "--size", "32"], "unknown option 'size'"),
        (["stats", "imagenet:/x"], "unknown source 'imagenet:/x'"),
        (["verify", "/no/store"], "not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "verify", "/no/store")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "LoadbenchError" in result.stderr


def test_stats_prints_counts_sizes_and_channel_statistics():
    result = run("stats", "digits", "--drop", "9")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "9 classes" in out
    assert "1,294" in out  # train images of the digits 0-8 (1,438 minus 144 nines)
    assert "8x8x1" in out and "channel mean" in out


def test_sources_and_formats_list_what_exists():
    sources = run("sources").stdout
    for kind in ("cifar10", "fashion-mnist", "tiny-imagenet", "folder", "digits", "synthetic"):
        assert kind in sources
    assert "masks-like" in sources and "512x512x3" in sources
    formats = run("formats").stdout
    assert "--chunk-images" in formats and "blosc-zstd" in formats


def test_train_predict_and_lr_find_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    trained = run("train", "digits?limit=60", "--widths", "8,16", "--epochs", "2", "--out", run_dir)
    assert trained.returncode == 0, trained.stderr
    assert "test accuracy" in trained.stdout and f"run directory: {run_dir}" in trained.stdout
    assert "epoch 2/2" in trained.stderr
    resumed = run("train", "--resume", run_dir, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 3/3" in resumed.stderr and "epoch 1/3" not in resumed.stderr
    again = run("train", "digits?limit=60", "--out", run_dir)
    assert again.returncode == 2 and "--resume" in again.stderr
    from PIL import Image

    Image.new("L", (9, 7), 128).save(tmp_path / "odd.png")
    predicted = run(
        "predict", run_dir / "model.pt", tmp_path / "odd.png", "--top", "2", "--resize", "none"
    )
    assert predicted.returncode == 0, predicted.stderr
    assert "odd.png (7x9):" in predicted.stdout and predicted.stdout.count("%") == 2
    scaled = run("predict", run_dir / "model.pt", tmp_path / "odd.png")  # --resize auto
    assert scaled.returncode == 0 and "odd.png (8x10):" in scaled.stdout  # shorter side 8
    found = run("lr-find", "digits?limit=60", "--iterations", "30", "--out", tmp_path / "lrf")
    assert found.returncode == 0, found.stderr
    assert (tmp_path / "lrf" / "lr_find.png").is_file()
    assert (tmp_path / "lrf" / "lr_find.csv").read_text().startswith("lr,loss,smoothed_loss")


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "digits", "--lr", "0"], "'lr': Input should be greater than 0"),
        (["train", "digits", "--epochs", "0"], "'epochs'"),
        (["train", "digits", "--model", "vgg"], "unknown model 'vgg'"),
        pytest.param(
            ["train", "digits", "--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        (["train", "--resume", "/no/run"], "not a training run"),
        (["predict", "/no/model.pt", "x.png"], "/no/model.pt does not exist"),
        (["models", "--input", "32x32"], "is not HxWxC"),
    ],
)
def test_bad_training_input_is_one_line(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
