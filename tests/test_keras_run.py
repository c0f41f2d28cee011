"""Keras runs beside torch's: records with torch's keys and sane values in every graph mode, from
a tfrecord store (loadbench's loader, torch's epoch order) and a tf-data store (tf.data's own
pipeline); a warm-up that changes nothing; torch's optimizer steps and schedules; the run
directory of `loadbench train --framework keras`; clear refusals; and TensorFlow kept out of
`import loadbench`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import loadbench
from loadbench.errors import LoadbenchError
from loadbench.training.config import TrainConfig
from loadbench.training.loop import Run
from loadbench.training.models import create_model
from loadbench.training.optim import current_lr, make_optimizer, make_schedule

# Not importorskip: TensorFlow is imported through the tf-data peer only (see tf_runtime.py).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed"
)

TRAIN_IMAGES = 200  # digits?limit=200: 200 train and 200 test images, 8x8x1, 10 classes
SMALL = {"model": "mlp", "hidden": "32", "batch_size": 32, "epochs": 2}
PEER = "torchvision-imagefolder"  # another project's torch pipeline


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same 400 digits as a tfrecord store (loadbench's loader) and a tf-data store."""
    root = tmp_path_factory.mktemp("keras")
    source = loadbench.load_source(f"digits?limit={TRAIN_IMAGES}")
    made = {
        kind: loadbench.convert(source, kind, root / kind, shard_size=64)
        for kind in ("tfrecord", "tf-data")
    }
    return made | {PEER: loadbench.convert(source.spec, PEER, root / PEER)}


def keras_run(store, graph="compiled", **overrides):
    from loadbench.frameworks.keras_run import KerasRun

    model = {} if "model" in overrides else {"model": "mlp", "hidden": "32"}
    settings = {**SMALL, **model, **overrides}
    if "model" in overrides:
        del settings["hidden"]
    config = TrainConfig(data=store.path, framework="keras", **settings)
    return KerasRun(config, store, graph=graph)


@pytest.fixture(scope="module")
def torch_record(stores):
    """A torch run's epoch record on the same store and settings."""
    store = stores["tfrecord"]
    with Run(TrainConfig(data=store.path, **{**SMALL, "epochs": 1}), store) as run:
        run.fit()
    return run.history[0]


# -- records --------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["eager", "compiled", "xla"])
@pytest.mark.parametrize("kind", ["tfrecord", "tf-data"])
def test_records_have_torchs_keys_and_sane_values(stores, torch_record, kind, graph):
    seen = []
    run = keras_run(stores[kind], graph)
    run.callbacks, run.epoch_extras = (seen.append,), lambda: {"telemetry": 1}
    with run:
        run.warm_up()
        run.fit()
    assert run.compile_time_s > 0 and run.device == "cpu" and run.graph == graph
    assert len(run.history) == 2 and seen == run.history
    assert (run.train_order is None) == (kind == "tf-data")  # tf.data streams in its own order
    for epoch, record in enumerate(run.history, 1):
        assert set(record) == set(torch_record) | {"telemetry"}
        assert record["epoch"] == epoch and record["lr"] == pytest.approx(0.001)
        assert record["time_s"] > 0 and 0 <= record["data_wait_s"] <= record["time_s"]
        assert 0 < record["compute_s"] <= record["time_s"] and 0 < record["au"] <= 1
        assert 0 < record["first_batch_s"] <= record["time_s"] and record["timing"] == "sync"
        assert record["images"] == TRAIN_IMAGES and record["images_per_s"] > 0
        for key in ("train_accuracy", "test_accuracy"):
            assert 0 <= record[key] <= 1
        assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
        assert record["eval_time_s"] > 0
    loss, predicted, targets = run.predict(run.eval_batches)
    assert loss == pytest.approx(run.history[-1]["test_loss"], rel=1e-6)
    assert len(predicted) == len(targets) == TRAIN_IMAGES


def test_loader_workers_start_and_stop_cleanly(stores):
    """DataLoader workers (the ring of shared buffers) feed tf.data, and stop with the run."""
    with keras_run(stores["tfrecord"], access="batch", workers=2, epochs=1) as run:
        run.fit()
        workers = run.train_batches.loader.loader._iterator._workers
    assert run.history[0]["images"] == TRAIN_IMAGES
    assert [w.exitcode for w in workers] == [0, 0]


def test_the_loss_decreases_epoch_by_epoch(stores):
    with keras_run(stores["tfrecord"], epochs=4, lr=0.01) as run:
        run.warm_up()
        run.fit()
    losses = [r["train_loss"] for r in run.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.7 * losses[0]
    assert run.history[-1]["test_accuracy"] > 0.5


def test_loadbench_formats_come_in_torchs_epoch_order(stores):
    """The tf.data wrapper hands Keras the batches torch's run iterates, in its order."""
    store = stores["tfrecord"]
    with keras_run(store) as run, Run(TrainConfig(data=store.path, **SMALL), store) as torch_run:
        ours = list(run.train_batches.dataset(3))
        torch_run.train_order.set_epoch(3)
        theirs = list(torch_run.train_batches)
    assert len(ours) == len(theirs) == len(run.train_batches) == 7
    for (images, labels), (torch_images, torch_labels) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(labels.numpy(), torch_labels.numpy())
        np.testing.assert_array_equal(images.numpy(), torch_images.numpy())
    assert run.train_batches.stages is getattr(run.train_batches.loader, "stages", None)


def test_the_warm_up_changes_nothing(stores):
    """Weights, batch-norm statistics, dropout seeds and the optimizer's state as they were."""
    options = {"model": "cnn-blocks", "widths": "4,8", "batch_norm": True, "dropout": 0.2}
    with keras_run(stores["tfrecord"], **options) as run:
        state = [*run.model.variables, *run.optimizer.variables]
        before = [np.array(v.numpy()) for v in state]
        run.warm_up()
        after = [np.array(v.numpy()) for v in state]
    assert run.compile_time_s > 0 and run.sanity["initial_loss"] > 0
    assert int(run.optimizer.iterations.numpy()) == 0
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


# -- optimizers and schedules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "adam"},
        {"optimizer": "adamw", "weight_decay": 0.1, "lr": 0.01},
        {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "lr": 0.1},
        {"optimizer": "sgd", "weight_decay": 0.05, "lr": 0.1},
    ],
    ids=["adam", "adamw", "sgd-nesterov", "sgd-decay"],
)
def test_optimizer_steps_are_torchs(settings):
    """Three steps from the same weights end at the same weights."""
    from loadbench.frameworks.keras_models import create_keras_model
    from loadbench.frameworks.keras_optim import keras_optimizer
    from loadbench.frameworks.tf_runtime import import_keras

    _, keras = import_keras()
    config = TrainConfig(data="unused", **settings)
    torch.manual_seed(1)
    net = create_model("mlp", (1, 4, 4), 3, hidden=(5,))
    model = create_keras_model(keras, "mlp", (1, 4, 4), 3, hidden=(5,))
    model.set_weights([p.detach().numpy().T for p in net.parameters()])  # weight, bias pairs
    model.compile(optimizer=keras_optimizer(keras, config, 1), run_eagerly=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    optimizer = make_optimizer(net, config)
    images, labels = torch.rand(8, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        model.train_on_batch(images.numpy(), labels.numpy())
    for theirs, ours in zip(net.parameters(), model.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs.detach().numpy().T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"schedule": "step", "epochs": 7},
        {"schedule": "step", "epochs": 2, "step_size": 5},
        {"schedule": "multistep", "epochs": 8, "milestones": "0,3,3,5", "gamma": 0.5},
        {"schedule": "cyclic", "epochs": 6, "cycle_epochs": 1.5},
        {"schedule": "cosine-restarts", "epochs": 8, "restart_epochs": 2, "restart_mult": 2},
    ],
    ids=lambda s: s["schedule"],
)
def test_schedules_give_each_step_torchs_lr(settings):
    from loadbench.frameworks.keras_optim import keras_schedule
    from loadbench.frameworks.tf_runtime import import_keras

    _, keras = import_keras()
    config, steps = TrainConfig(data="unused", **settings), 7
    optimizer = make_optimizer(torch.nn.Linear(2, 2), config)
    schedule = make_schedule(optimizer, config, steps)
    expected = []
    for epoch in range(config.epochs):
        for i in range(steps):
            expected.append(current_lr(optimizer))
            optimizer.step()
            schedule.after_batch(epoch, i, steps)
        schedule.after_epoch()
    ours = keras_schedule(keras, config, steps)
    got = [float(ours(step)) if callable(ours) else ours for step in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "resnet18"}, "'resnet18' has no Keras version"),
        ({"optimizer": "rmsprop"}, "epsilon under the square root"),
        ({"weight_decay": 0.01}, "use --optimizer adamw"),
        ({"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1}, "through the momentum"),
        ({"optimizer": "sgd", "momentum": 0.9, "schedule": "step"}, "lr inside the momentum"),
        ({"schedule": "onecycle"}, "OneCycleLR cycles the momentum"),
        ({"amp": True}, "--amp"),
        ({"compile": True}, "--compile is torch.compile"),
        ({"early_stopping": 3}, "--early-stopping"),
        ({"kfold": 3}, "--kfold"),
    ],
)
def test_what_keras_would_do_otherwise_is_refused(settings, message):
    from loadbench.frameworks.keras_run import check_keras_config

    with pytest.raises(LoadbenchError, match=message):
        check_keras_config(TrainConfig(data="unused", framework="keras", **settings))


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("tf-data", {"augment": "flip"}, "augmentation runs in torch"),
        ("tf-data", {"balance": "weighted"}, "its library's own order"),
        ("tf-data", {"access": "batch"}, "sample access only"),
        ("tfrecord", {"access": "device"}, "torch's device memory"),
    ],
)
def test_loading_a_keras_run_cannot_do_is_refused(stores, kind, settings, message):
    with pytest.raises(LoadbenchError, match=message):
        keras_run(stores[kind], **settings)


def test_graph_flags_in_torchs_terms():
    assert TrainConfig(data="x", graph="compiled").compile  # torch's compiled graph
    with pytest.raises(LoadbenchError, match="xla is Keras"):
        TrainConfig(data="x", graph="xla")
    with pytest.raises(LoadbenchError, match="--compile with --graph eager"):
        TrainConfig(data="x", framework="keras", graph="eager", compile=True)


# -- the command line -----------------------------------------------------------------------------


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`loadbench ARGS` in this process (TensorFlow loads once per test file): (exit code,
    stdout, stderr)."""
    from loadbench.cli import main

    monkeypatch.setattr(sys, "argv", ["loadbench", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_the_run_directory(stores, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        monkeypatch, capsys, "train", stores["tfrecord"].path, "--framework", "keras",
        "--epochs", "1", "--model", "mlp", "--hidden", "16", "--schedule", "cyclic", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    for name in ("config.yaml", "history.csv", "metrics.json", "curves.png", "confusion.png",
                 "model.keras"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["framework"] == "keras" and metrics["graph"] == "compiled"
    assert metrics["parameters"]["total"] == 64 * 16 + 16 + 16 * 10 + 10
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["images"]["test"] == TRAIN_IMAGES
    assert "framework: keras" in (out / "config.yaml").read_text()
    assert "keras compiled" in stderr and "run directory" in stdout
    assert len((out / "history.csv").read_text().splitlines()) == 2
    from loadbench.frameworks.tf_runtime import import_keras

    model = import_keras()[1].models.load_model(out / "model.keras")  # a plain Keras model
    assert model.count_params() == metrics["parameters"]["total"]


@pytest.mark.parametrize(
    ("store", "args", "message"),
    [
        ("tfrecord", ("--framework", "keras", "--model", "resnet18"), "has no Keras version"),
        ("tfrecord", ("--framework", "keras", "--optimizer", "rmsprop"), "rmsprop"),
        ("tfrecord", ("--graph", "xla"), "xla is Keras"),
        (PEER, ("--framework", "keras"), "another project's torch pipeline"),
    ],
)
def test_what_keras_cannot_do_ends_in_one_line_and_exit_2(stores, tmp_path, monkeypatch, capsys,
                                                          store, args, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, _, stderr = cli(monkeypatch, capsys, "train", stores[store].path, *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # refused before a run directory is made


def test_help_shows_the_flags_with_an_example(monkeypatch, capsys):
    code, stdout, _ = cli(monkeypatch, capsys, "train", "--help")
    assert code == 0 and "--framework" in stdout and "--graph" in stdout
    assert "--framework keras --graph xla" in stdout


def test_loadbench_imports_no_tensorflow():
    code = (
        "import sys, loadbench, loadbench.cli, loadbench.frameworks.keras_train; "
        "print([m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
