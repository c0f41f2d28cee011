"""Training runs as users run them: outputs, resume, determinism, access modes, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import loadbench
from loadbench.errors import LoadbenchError
from loadbench.training.config import TrainConfig, load_config
from loadbench.training.loop import Run
from loadbench.training.lr_find import LrFindResult, choose_lr, describe, lr_find, suggest
from loadbench.training.optim import current_lr, make_optimizer, make_schedule
from loadbench.training.predict import predict_files
from loadbench.training.runfiles import history_columns
from loadbench.training.train import train

FAST = {"widths": "8,16", "batch_size": 32}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """160 train + 48 test 16x16 RGB images of 4 classes, as an npy store."""
    source = loadbench.load_source(
        "synthetic:cifar-like?count=160&eval_count=48&size=16&classes=4&seed=3"
    )
    return loadbench.convert(source, "npy", tmp_path_factory.mktemp("tiny") / "npy")


def config(store, tmp_path, **overrides) -> TrainConfig:
    values = {"data": store.path, "epochs": 2, "out": str(tmp_path / "run"), **FAST, **overrides}
    return TrainConfig(**values)


def losses(history):
    """(train loss, held-out loss and accuracy) per epoch; the tiny store has no val split, so
    the test split is evaluated, and named so."""
    split = "val" if "val_loss" in history[0] else "test"
    return [(r["train_loss"], r[f"{split}_loss"], r[f"{split}_accuracy"]) for r in history]


# -- outputs ---------------------------------------------------------------------------------------


def test_a_run_writes_every_output(tiny_store, tmp_path):
    result = train(config(tiny_store, tmp_path))
    out = tmp_path / "run"
    for name in ("history.csv", "metrics.json", "curves.png", "confusion.png", "model.pt",
                 "config.yaml", "checkpoint.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == list(history_columns("test"))  # the split evaluated, named truly
    assert all(float(r["time_s"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_split"] == "test"  # the store has no val split: said and used
    test = metrics["test"]
    assert 0 <= test["accuracy"] <= 1 and len(test["confusion_matrix"]) == 4
    assert sum(map(sum, test["confusion_matrix"])) == 48
    assert set(test["per_class"]) == set(tiny_store.classes)
    assert metrics["epoch_time_s"]["first"] == pytest.approx(float(rows[0]["time_s"]))
    assert metrics["parameters"]["total"] == metrics["parameters"]["trainable"] > 0
    blob = torch.load(out / "model.pt", weights_only=True)  # safe loading works
    assert blob["classes"] == tiny_store.classes and blob["input_shape"] == [3, 16, 16]
    assert len(blob["mean"]) == 3 and blob["model"] == "cnn-blocks"
    saved = load_config(str(out / "config.yaml"))
    assert saved.widths == [8, 16] and saved.epochs == 2  # the values used, resolved
    assert result.history[-1]["test_accuracy"] == test["accuracy"]


def test_normalisation_uses_the_training_split_only(tiny_store, tmp_path):
    run = Run(config(tiny_store, tmp_path))
    images, _ = tiny_store.raw("train").read_batch(np.arange(160))
    expected = (images.reshape(-1, 3) / 255.0).mean(axis=0)
    np.testing.assert_allclose(run.mean, expected, rtol=1e-6)
    tiny = Run(config(tiny_store, tmp_path, model="cnn-tiny", widths=None))
    assert tiny.mean == [0.0] * 3 and tiny.std == [1.0] * 3  # document 004: inputs in [0, 1]


def test_a_val_split_is_carved_when_the_store_has_none(tmp_path):
    source = loadbench.load_source("digits", limit=100)
    train_only = loadbench.from_arrays({"train": source.split("train")})
    store = loadbench.convert(train_only, "npy", tmp_path / "train-only")
    run = Run(TrainConfig(data=store.path, **FAST, out=str(tmp_path / "r")))
    assert run.plan.eval_split == "val" and run.plan.eval_source == "train"
    assert len(run.plan.eval_indices) == 10 and "carved" in run.plan.note
    assert not set(run.plan.eval_indices) & set(run.plan.train_indices)


# -- reproducibility, resume, interruption ---------------------------------------------------


def test_same_seed_same_history(tiny_store, tmp_path):
    a = train(config(tiny_store, tmp_path / "a", augment="flip,crop"))
    b = train(config(tiny_store, tmp_path / "b", augment="flip,crop"))
    c = train(config(tiny_store, tmp_path / "c", augment="flip,crop", seed=1))
    assert losses(a.history) == losses(b.history)
    assert losses(a.history) != losses(c.history)


@pytest.mark.parametrize("access,workers", [("batch", 0), ("device", 0), ("sample", 2)])
def test_access_mode_and_workers_change_speed_not_learning(tiny_store, tmp_path, access, workers):
    reference = train(config(tiny_store, tmp_path / "ref", augment="flip"))
    other = train(
        config(tiny_store, tmp_path / "x", augment="flip", access=access, workers=workers)
    )
    np.testing.assert_allclose(losses(other.history), losses(reference.history), rtol=1e-5)


def test_resume_continues_exactly(tiny_store, tmp_path):
    straight = train(
        config(tiny_store, tmp_path / "straight", epochs=4, schedule="cosine-restarts")
    )
    first = config(tiny_store, tmp_path / "split", epochs=2, schedule="cosine-restarts")
    train(first)
    with pytest.raises(LoadbenchError, match="already holds a run; continue it with --resume"):
        train(first)
    resumed = train(first.model_copy(update={"epochs": 4}), resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    np.testing.assert_allclose(losses(resumed.history), losses(straight.history), rtol=1e-5)


def test_ctrl_c_leaves_a_checkpoint_to_resume_from(tiny_store, tmp_path):
    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    cfg = config(tiny_store, tmp_path, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=(interrupt,))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    resumed = train(cfg, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_early_stopping_restores_the_best_epoch(tiny_store, tmp_path):
    cfg = config(tiny_store, tmp_path, epochs=30, early_stopping=1, lr=0.05, optimizer="sgd")
    result = train(cfg)
    assert len(result.history) < 30
    best = min(result.history, key=lambda r: r["val_loss"])  # val: carved from train
    assert result.metrics["best_epoch"] == best["epoch"]
    assert result.metrics["val"]["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert result.metrics["eval_split"] == "val" and "test" in result.metrics


# -- optimizers, schedules, lr finder ---------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adam", "adamw"])
def test_every_optimizer_steps(optimizer):
    model = torch.nn.Linear(4, 2)
    nesterov = {"nesterov": True, "momentum": 0.9} if optimizer == "sgd" else {}
    cfg = TrainConfig(data="x", optimizer=optimizer, **nesterov)
    opt = make_optimizer(model, cfg)
    before = model.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.arange(8) % 2).backward()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert current_lr(opt) == (0.01 if optimizer == "sgd" else 0.001)


def _lrs(schedule: str, epochs: int = 8, batches: int = 4, **options) -> list[float]:
    """The lr at the start of every batch over a whole run."""
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(
        data="x", optimizer="sgd", lr=0.1, epochs=epochs, schedule=schedule, **options
    )
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, batches)
    seen = []
    for epoch in range(epochs):
        for b in range(batches):
            seen.append(current_lr(opt))
            opt.step()
            sched.after_batch(epoch, b, batches)
        sched.after_epoch()
    return seen


def test_schedules_change_the_lr_as_specified():
    assert set(_lrs("none")) == {0.1}
    step = _lrs("step", step_size=3)
    assert (
        step[0] == 0.1
        and step[3 * 4] == pytest.approx(0.01)
        and step[6 * 4] == pytest.approx(0.001)
    )
    multi = _lrs("multistep", milestones="2,6")
    assert (
        multi[1 * 4] == 0.1
        and multi[2 * 4] == pytest.approx(0.01)
        and multi[6 * 4] == pytest.approx(0.001)
    )
    cyclic = _lrs("cyclic", cycle_epochs=2)  # up in 1 epoch (4 batches), down in the next
    assert cyclic[0] == pytest.approx(0.1) and cyclic[4] == pytest.approx(0.4)
    assert cyclic[8] == pytest.approx(0.1)
    sgdr = _lrs("cosine-restarts", restart_epochs=2)
    assert sgdr[0] == pytest.approx(0.1) and sgdr[7] < 0.01 and sgdr[8] == pytest.approx(0.1)
    one = _lrs("onecycle")
    peak = int(np.argmax(one))
    assert one[0] == pytest.approx(0.1 / 25) and one[peak] == pytest.approx(0.1, rel=1e-3)
    assert peak == pytest.approx(0.25 * 32, abs=1) and one[-1] < 1e-4


def test_lr_find_sweeps_suggests_and_restores(tiny_store, tmp_path):
    run = Run(config(tiny_store, tmp_path, optimizer="sgd"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    result = lr_find(run, num_it=40)
    assert result.lrs[0] == pytest.approx(1e-7) and len(result.losses) <= 40
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    assert result.suggestion is not None and 1e-7 < result.suggestion < 10
    assert result.rule in ("valley", "min/10") and result.rule in describe(result)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k


SWEEP = np.logspace(-7, 1, 100)  # lr_find's default sweep: 1e-7 to 10 in 100 batches


def u_curve() -> np.ndarray:
    """Flat at 2.0 up to lr 1e-4, falling (linearly in log lr) to 0.8 at 0.1, then diverging."""
    x = np.log10(SWEEP)
    return np.where(x < -4, 2.0, np.where(x < -1, 2.0 - 0.4 * (x + 4), 0.8 + 2 * (x + 1) ** 2))


def steepest(lrs, smoothed) -> float:
    """The old rule: the lr of the steepest fall, past the first tenth of the sweep."""
    values, log_lr = np.asarray(smoothed), np.log10(lrs)
    first, last = len(values) // 10, len(values) - max(1, len(values) // 20)
    return float(lrs[first + int(np.argmin(np.gradient(values, log_lr)[first:last]))])


def test_the_valley_of_a_clean_curve_is_halfway_down_its_fall():
    curve = u_curve()
    chosen = choose_lr(list(SWEEP), list(curve))
    assert chosen.rule == "valley"
    lowest = float(SWEEP[np.argmin(curve)])
    assert chosen.min_loss_lr == lowest and 0.1 <= lowest < 0.2
    # The fall spans 1e-4..0.1; halfway down it (in batches) is about 3e-3.
    assert 1e-3 < chosen.lr < 1e-2
    assert suggest(list(SWEEP), list(curve)) == (chosen.lr, lowest)
    result = LrFindResult(list(SWEEP), list(curve), list(curve), chosen.lr, lowest, "valley")
    assert describe(result).startswith(f"suggested lr {chosen.lr:.3g} (valley: about halfway")


def test_a_noisy_start_with_a_deep_dip_does_not_move_the_valley():
    curve = u_curve()
    curve[:40] += np.random.default_rng(0).normal(0, 0.03, 40)  # noise while nothing is learnt
    curve[14:18] -= [0.3, 0.6, 0.6, 0.3]  # a dip steeper than the real fall
    assert steepest(SWEEP, curve) < 1e-5  # the old rule's pick: the dip, where nothing is learnt
    chosen = choose_lr(list(SWEEP), list(curve))
    assert chosen.rule == "valley" and 1e-4 < chosen.lr < 1e-2  # in the real fall
    assert 0.1 <= chosen.min_loss_lr < 0.2  # the dip (1.4..1.8) is above the fall's bottom


def test_a_curve_that_never_falls_has_no_suggestion():
    rising = list(1.0 + 0.01 * np.arange(100))
    chosen = choose_lr(list(SWEEP), rising)
    assert chosen.lr is None and chosen.rule is None
    assert chosen.min_loss_lr == SWEEP[10]  # the first point past the noisy start
    assert suggest(list(SWEEP), rising) == (None, SWEEP[10])
    assert choose_lr(list(SWEEP[:5]), [1.0, 0.9, 0.8, 0.7, 0.6]).lr is None  # too few points
    result = LrFindResult(list(SWEEP), rising, rising, None, chosen.min_loss_lr)
    assert describe(result).startswith("no lr to suggest")


def test_a_fall_too_short_for_a_valley_falls_back_to_a_tenth_of_the_lowest_loss():
    step = np.where(np.arange(100) < 50, 2.0, 1.5)  # one drop of two points: no valley to walk
    step[50] = 1.8
    step[90:] = [2.0 + i for i in range(10)]  # divergence: cut and never the lowest
    chosen = choose_lr(list(SWEEP), list(step))
    assert chosen.rule == "min/10" and chosen.min_loss_lr == SWEEP[51]
    assert chosen.lr == pytest.approx(SWEEP[51] / 10)
    result = LrFindResult(list(SWEEP), list(step), list(step), chosen.lr, SWEEP[51], "min/10")
    assert describe(result).startswith(f"suggested lr {chosen.lr:.3g} (min/10: a tenth")


def test_lr_find_on_noisy_labels_suggests_an_lr_that_learns(tmp_path):
    """The report: on noisy data the old rule (the steepest point of the smoothed loss) lay in
    the noise at the start of the sweep, and training at it learnt nothing. Here it picked
    7.2e-06 (test accuracy 0.335 after these 8 epochs); the valley picks 0.038 (0.9 or more)."""
    source = loadbench.load_source(
        "synthetic:cifar-like?count=600&eval_count=200&size=16&classes=3&seed=1"
    )
    images, labels = source.read("train", 0, 600)
    rng = np.random.default_rng(1)
    flip = rng.random(600) < 0.3  # 30% of the training labels redrawn at random
    labels = np.where(flip, rng.integers(0, 3, 600), labels)
    noisy = loadbench.from_arrays({"train": (images, labels), "test": source.read("test", 0, 200)})
    store = loadbench.convert(noisy, "npy", tmp_path / "noisy")
    settings = {"optimizer": "adam", "epochs": 8, "seed": 1}
    with Run(config(store, tmp_path, **settings)) as run:
        result = lr_find(run)
    assert result.rule == "valley" and 1e-4 < result.suggestion < 0.1
    trained = train(config(store, tmp_path, **settings, lr=result.suggestion))
    assert trained.metrics["test"]["accuracy"] >= 0.6  # chance: 1/3


# -- sanity checks, balance, k-fold -----------------------------------------------------------


def test_initial_loss_is_near_ln_classes_and_one_batch_is_learnt(tiny_store, tmp_path):
    run = Run(config(tiny_store, tmp_path, batch_norm=True))
    sanity = run.initial_loss()
    assert sanity["expected_ln_classes"] == pytest.approx(math.log(4))
    assert not sanity["far_from_expected"]
    result = run.overfit_batch()
    assert result["learnt"] and result["accuracy"] == 1.0


def test_balancing_an_imbalanced_split(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 60 + [1] * 12 + [2] * 8)
    images = rng.integers(0, 256, (80, 8, 8, 1), dtype=np.uint8)
    source = loadbench.from_arrays({"train": (images, labels), "test": (images[:9], labels[:9])})
    store = loadbench.convert(source, "npy", tmp_path / "s")
    weighted = Run(TrainConfig(data=store.path, balance="weighted", **FAST))
    drawn, _ = weighted.train_order.draw()
    assert len(drawn) == 80 and np.bincount(labels[drawn]).min() > 12  # minorities drawn more
    over = Run(TrainConfig(data=store.path, balance="oversample", **FAST))
    drawn, copies = over.train_order.draw()
    assert np.bincount(labels[drawn]).tolist() == [60, 60, 60]
    assert copies.sum() == 60 * 3 - 80 and not copies[np.isin(drawn, np.arange(60))].any()
    result = train(
        TrainConfig(
            data=store.path, balance="oversample", epochs=1, out=str(tmp_path / "r"), **FAST
        )
    )
    assert result.history[0]["images_per_s"] > 0


def test_kfold_reports_mean_and_std(tiny_store, tmp_path):
    result = train(config(tiny_store, tmp_path, kfold=2, epochs=1))
    summary = json.loads((tmp_path / "run" / "kfold.json").read_text())
    assert summary["folds"] == 2 and len(summary["accuracy"]["per_fold"]) == 2
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(summary["accuracy"]["per_fold"]))
    assert (tmp_path / "run" / "fold-1" / "model.pt").is_file()
    assert (tmp_path / "run" / "fold-2" / "metrics.json").is_file()
    assert result.metrics["kfold"] == summary


def test_amp_on_the_cpu_trains(tiny_store, tmp_path):
    result = train(config(tiny_store, tmp_path, amp=True, epochs=1))
    assert math.isfinite(result.history[0]["train_loss"])


# -- predict ---------------------------------------------------------------------------------------


def test_predict_a_non_square_image_with_a_gap_model(tiny_store, tmp_path):
    train(config(tiny_store, tmp_path, head="gap"))
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 32, 3), dtype=np.uint8)).save(
        image
    )
    model = str(tmp_path / "run" / "model.pt")
    (prediction,) = predict_files(model, [str(image)], top=4, resize="none")
    assert prediction.size == (28, 32)
    assert [name for name, _ in prediction.top] != [] and len(prediction.top) == 4
    assert sum(p for _, p in prediction.top) == pytest.approx(1.0, abs=1e-5)
    (scaled,) = predict_files(model, [str(image)])  # auto: at the training scale (16 px)
    assert scaled.size == (16, 18)


def test_predict_resizes_for_a_fixed_size_model(tiny_store, tmp_path):
    train(config(tiny_store, tmp_path, head="flatten"))
    image = tmp_path / "big.jpg"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(image)
    (prediction,) = predict_files(str(tmp_path / "run" / "model.pt"), [str(image)])
    assert prediction.size == (16, 16)


def test_predict_names_a_broken_image(tiny_store, tmp_path):
    train(config(tiny_store, tmp_path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(LoadbenchError, match="broken.png"):
        predict_files(str(tmp_path / "run" / "model.pt"), [str(broken)])
    with pytest.raises(LoadbenchError, match="not a model saved by|cannot be loaded"):
        predict_files(str(tmp_path / "run" / "config.yaml"), [str(broken)])


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lr": 0}, "'lr': Input should be greater than 0"),
        ({"epochs": -1}, "'epochs': Input should be greater than 0"),
        ({"optimizer": "lion"}, "'optimizer'"),
        ({"augment": "mixup"}, "unknown augmentation 'mixup'"),
        ({"colour": "red"}, "unknown training option 'colour'"),
    ],
)
def test_bad_options_are_named(overrides, message):
    with pytest.raises(LoadbenchError, match=message):
        load_config(None, data="digits", **overrides)


def test_yaml_config_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: digits\nepochs: 3\nlr: 0.5\n")
    assert load_config(str(path), lr=0.1).lr == 0.1  # the flag wins
    assert load_config(str(path)).epochs == 3
    path.write_text("data: digits\nepoch: 3\n")
    with pytest.raises(LoadbenchError, match=r"unknown key in .*c.yaml 'epoch'"):
        load_config(str(path))


def test_model_problems_are_clear(tmp_path):
    small = loadbench.from_arrays({"train": (np.zeros((8, 4, 4), np.uint8), np.arange(8) % 2)})
    store = loadbench.convert(small, "npy", tmp_path / "small")
    with pytest.raises(LoadbenchError, match="cnn-tiny"):
        Run(TrainConfig(data=store.path, model="cnn-tiny"))
    with pytest.raises(LoadbenchError, match="model 'mlp' has no option 'filters'"):
        Run(TrainConfig(data=store.path, model="mlp", filters=3))
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(LoadbenchError, match="weights.pt"):
        Run(TrainConfig(data=store.path, model="resnet18", weights=str(bad)))


# -- quality bar and slow paths ------------------------------------------------------------------


def test_digits_reach_95_percent_with_the_documented_command(tmp_path):
    """README promise: `loadbench train digits --model cnn-blocks --head gap --epochs 15`."""
    cfg = TrainConfig(data="digits", model="cnn-blocks", head="gap", epochs=15, out=str(tmp_path))
    result = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval_split"] == "test"
    assert metrics["test"]["accuracy"] >= 0.95
    assert result.metrics["test"]["accuracy"] == metrics["test"]["accuracy"]


@pytest.mark.slow
def test_compiled_model_learns_the_same_and_reports_compile_time(tiny_store, tmp_path):
    eager = train(config(tiny_store, tmp_path / "eager"))
    compiled = train(config(tiny_store, tmp_path / "compiled", compile=True))
    assert compiled.metrics["compile_time_s"] > 0 and eager.metrics["compile_time_s"] == 0
    np.testing.assert_allclose(losses(compiled.history), losses(eager.history), rtol=1e-3)


def test_a_one_cycle_run_cannot_be_stretched_on_resume(tiny_store, tmp_path):
    cfg = config(tiny_store, tmp_path, schedule="onecycle", epochs=1)
    train(cfg)
    with pytest.raises(LoadbenchError, match="one-cycle schedule .* cannot be extended"):
        train(cfg.model_copy(update={"epochs": 3}), resume=True)


def test_a_frozen_backbone_keeps_its_batch_norm_statistics(tiny_store, tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pt"  # a frozen backbone needs weights to keep
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    run = Run(config(tiny_store, tmp_path, model="resnet18", widths=None, freeze_backbone=True,
                     weights=str(weights)))  # fmt: skip
    before = run.model.net.bn1.running_mean.clone()
    run.train_epoch(1)
    assert torch.equal(run.model.net.bn1.running_mean, before)
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all(".fc." in n for n in trainable)
