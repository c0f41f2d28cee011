"""The course documents' steps (../shared/SEEDS.md, documents 002-004) as a user runs them: class
remapping and a 70/15/15 split, balancing, early stopping without selecting on test data,
optimizer defaults, parameter counts, and predicting new images at the right scale."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import loadbench
from loadbench.errors import LoadbenchError
from loadbench.training.config import TrainConfig
from loadbench.training.optim import make_optimizer, optimizer_settings
from loadbench.training.train import train

FAST = {"model": "cnn-blocks", "widths": "8,16", "batch_size": 32, "epochs": 2}


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadbench", *map(str, args)], capture_output=True, text=True,
        cwd=cwd, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


# -- document 002: remap 10 -> 3 classes, drop one, split 70/15/15 with seed 1001 ---------------


def test_remap_drop_and_resplit_70_15_15():
    source = loadbench.load_source(
        "digits", remap="low=0,1,2;mid=3,4,5;high=6,7,8", drop="9", resplit="70,15,15", seed=1001
    )
    counts = {split: source.count(split) for split in source.splits}
    total = sum(counts.values())
    assert source.classes == ["low", "mid", "high"] and list(counts) == ["train", "val", "test"]
    assert total == 1797 - 180  # every image of every split, but the nines
    for split, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert abs(counts[split] / total - share) < 0.01
        per_class = np.bincount(source.labels(split), minlength=3) / counts[split]
        assert np.all(np.abs(per_class - 1 / 3) < 0.03)  # stratified
    assert any("resplit: pooled 1,617 images of train, test" in note for note in source.notes)
    again = loadbench.load_source(source.spec)  # seeded: the same split from its spec
    assert np.array_equal(again.split("val")[1], source.split("val")[1])
    other = loadbench.load_source("digits", drop="9", resplit="70,15,15", seed=7)
    assert not np.array_equal(other.split("val")[0], source.split("val")[0])


def test_resplit_refuses_what_it_cannot_mean():
    with pytest.raises(LoadbenchError, match="summing to 100"):
        loadbench.load_source("digits", resplit="70,15")
    with pytest.raises(LoadbenchError, match="drop val_ratio/test_ratio"):
        loadbench.load_source("digits", resplit="70,15,15", test_ratio=0.1)


def test_train_takes_source_options_as_flags(tmp_path):
    run_dir = tmp_path / "run"
    done = cli(
        "train", "digits", "--remap", "low=0,1,2,3,4;high=5,6,7,8,9", "--resplit", "70,15,15",
        "--seed", "1001", "--widths", "8", "--epochs", "1", "--out", run_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resplit: pooled 1,797 images" in done.stderr
    assert "val accuracy" in done.stdout and "test accuracy" in done.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["resplit"] == "70,15,15" and saved["seed"] == 1001
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images"] == {"train": 1259, "val": 269, "test": 269}
    store = loadbench.convert("digits?limit=20", "npy", tmp_path / "store")
    refused = cli("train", store.path, "--remap", "a=0", "--out", tmp_path / "r2")
    assert refused.returncode == 2 and "--remap apply to a source" in refused.stderr


# -- document 002: balancing, early stopping, results where a user looks -------------------------


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    """Three classes of 60, 20 and 10 training images; a test split, no val split."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 20, 10])
    images = (rng.random((90, 8, 8, 1)) * 40 + labels[:, None, None, None] * 80).astype(np.uint8)
    test_labels = np.repeat([0, 1, 2], 10)
    test = (rng.random((30, 8, 8, 1)) * 40 + test_labels[:, None, None, None] * 80).astype(np.uint8)
    source = loadbench.from_arrays(
        {"train": (images, labels), "test": (test, test_labels)}, classes=["a", "b", "c"]
    )
    return loadbench.convert(source, "npy", tmp_path_factory.mktemp("unbalanced") / "s")


def test_oversampling_shows_the_class_counts_of_an_epoch(unbalanced, tmp_path):
    result = train(TrainConfig(data=unbalanced.path, balance="oversample", out=str(tmp_path),
                               **FAST))  # fmt: skip
    assert result.metrics["epoch_class_counts"] == {"a": 60, "b": 60, "c": 60}
    assert result.history[0]["images"] == 180
    weighted = train(TrainConfig(data=unbalanced.path, balance="weighted",
                                 out=str(tmp_path / "w"), **FAST))  # fmt: skip
    counts = weighted.metrics["epoch_class_counts"]
    assert sum(counts.values()) == 90 and min(counts.values()) > 15  # drawn near evenly


def test_early_stopping_never_chooses_on_the_test_split(unbalanced, tmp_path):
    config = TrainConfig(data=unbalanced.path, early_stopping=1, out=str(tmp_path), **FAST)
    result = train(config)
    metrics = result.metrics
    assert metrics["eval_split"] == "val" and metrics["val_carved_ratio"] == 0.1
    assert "for early stopping" in metrics["eval_note"]
    assert metrics["images"] == {"train": 81, "val": 9, "test": 30}
    assert "val_loss" in result.history[0] and "test_loss" not in result.history[0]
    best = min(result.history, key=lambda r: r["val_loss"])
    assert metrics["val"]["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "confusion-test.png").is_file()
    header = (tmp_path / "history.csv").read_text().splitlines()[0]
    assert "val_loss" in header
    with pytest.raises(LoadbenchError, match="would choose it on test data"):
        train(config.model_copy(update={"eval_split": "test", "out": str(tmp_path / "t")}))


def test_without_a_choice_the_test_split_is_evaluated_and_named_test(unbalanced, tmp_path):
    result = train(TrainConfig(data=unbalanced.path, out=str(tmp_path), **FAST))
    assert result.metrics["eval_split"] == "test"
    assert "test_loss" in result.history[0] and "val_loss" not in result.history[0]
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert "test_loss" in header and "test_accuracy" in header and "val_loss" not in header


def test_the_run_ends_with_val_and_test_metrics_and_its_times(unbalanced, tmp_path):
    run_dir = tmp_path / "run"
    done = cli("train", unbalanced.path, "--widths", "8", "--epochs", "2", "--val-ratio", "0.2",
               "--out", run_dir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = " ".join(done.stdout.split())  # the summary, however the console wrapped it
    assert "val accuracy" in line and "test accuracy" in line and "macro F1" in line
    assert "s evaluation" in line and "wall time" in line
    assert "(+" in done.stderr and "s eval)" in done.stderr  # each epoch: evaluation beside it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_time_s"]["mean"] > 0 and metrics["wall_time_s"] > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["widths"] == [8] and saved["activation"] == "relu"  # values used, not nulls
    assert saved["lr"] == 0.001 and saved["weight_decay"] == 0.0 and saved["normalize"] is True
    resumed = cli("train", "--resume", run_dir, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr  # the resolved config reads back


# -- document 003: optimizers as PyTorch and Keras define them -----------------------------------


def test_optimizer_defaults_are_the_frameworks():
    model = torch.nn.Linear(2, 2)
    sgd = make_optimizer(model, TrainConfig(data="x", optimizer="sgd"))
    assert sgd.defaults["momentum"] == 0 and sgd.defaults["nesterov"] is False
    rmsprop = make_optimizer(model, TrainConfig(data="x", optimizer="rmsprop"))
    assert rmsprop.defaults["momentum"] == 0
    adamw = make_optimizer(model, TrainConfig(data="x", optimizer="adamw"))
    assert adamw.defaults["weight_decay"] == 0.01
    nesterov = TrainConfig(data="x", optimizer="sgd", momentum=0.9, nesterov=True)
    assert optimizer_settings(nesterov) == {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.9,
                                            "nesterov": True}  # fmt: skip


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"optimizer": "sgd", "nesterov": True}, "--nesterov needs sgd with a momentum above 0"),
        ({"optimizer": "adam", "nesterov": True}, "--nesterov needs sgd"),
        ({"optimizer": "adam", "momentum": 0.9}, "adam has no momentum"),
    ],
)
def test_incoherent_optimizer_settings_are_errors(settings, message):
    with pytest.raises(LoadbenchError, match=message):
        make_optimizer(torch.nn.Linear(2, 2), TrainConfig(data="x", **settings))


# -- document 004: parameter counts, and predicting new images -----------------------------------


def test_models_counts_parameters_with_model_options():
    done = cli("models", "--filters", "20")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "cnn-tiny" in line)
    # 3x3 convs 3->20 and 20->20 with biases, 8x8 max-pool of 32x32, a 10-class linear layer.
    expected = (3 * 20 * 9 + 20) + (20 * 20 * 9 + 20) + (20 * 4 * 4 * 10 + 10)
    assert f"{expected:,}" in row and "filters=20" in row


def test_models_are_counted_without_torch():
    """`loadbench models` starts in about a second: counting builds no network."""
    code = (
        "import sys; from loadbench.training.models import models_table; "
        "models_table((3, 224, 224), 1000, filters=20); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_version_alone():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("loadbench ")
