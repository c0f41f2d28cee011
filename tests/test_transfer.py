"""Transfer learning that transfers: a pretrained ResNet's weights are used whole or refused with
one error, never silently replaced by fresh layers; small images keep the pretrained stem."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import loadbench
from loadbench import progress
from loadbench.errors import LoadbenchError
from loadbench.training.config import TrainConfig
from loadbench.training.loop import Run
from loadbench.training.models import PRETRAINED_SMALL_STEM, create_model, parameters
from loadbench.training.train import train


@pytest.fixture(scope="module")
def store_32px(tmp_path_factory):
    """64 train + 32 test 32x32 RGB images of 4 classes, as an npy store."""
    source = loadbench.load_source(
        "synthetic:cifar-like?count=64&eval_count=32&size=32&classes=4&seed=5"
    )
    return loadbench.convert(source, "npy", tmp_path_factory.mktemp("small") / "npy")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet18 state dict (ImageNet stem, 1000 classes) whose every tensor differs from what
    a fresh model starts with, batch-norm statistics and counters included: a tensor left at its
    initial value cannot pass for a loaded one."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            tensor.fill_(1234)
        elif key.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
        else:
            tensor.add_(0.1 * torch.randn_like(tensor))
    path = tmp_path_factory.mktemp("weights") / "r18.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture
def notes(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(progress, "note", said.append)
    return said


# --- a frozen pretrained backbone, trained ------------------------------------------------------


@pytest.mark.parametrize("stem", ["auto", "stride1", "upsample"])
def test_a_frozen_pretrained_backbone_is_the_files_after_an_epoch(
    store_32px, weights, tmp_path, stem
):
    path, saved = weights
    config = TrainConfig(
        data=store_32px.path, model="resnet18", weights=str(path), freeze_backbone=True,
        stem=stem, epochs=1, batch_size=32, out=str(tmp_path / "run"),
    )  # fmt: skip
    with Run(config) as run:
        net = run.model.net
        head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc.")}
        run.train_epoch(1)
    state = net.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert sorted(backbone) == sorted(k for k in saved if not k.startswith("fc."))
    changed = [k for k in backbone if not torch.equal(state[k], saved[k])]
    assert changed == []  # parameters, running statistics and num_batches_tracked alike
    assert net.fc.out_features == 4 and head["fc.weight"].shape == (4, 512)
    assert not torch.equal(state["fc.weight"], head["fc.weight"])  # the new head learnt
    assert net.conv1.kernel_size == (7, 7)


def test_auto_stem_with_weights_on_small_images(weights, notes):
    path, saved = weights
    small = create_model("resnet18", (3, 32, 32), 10, weights=str(path))
    pretrained = create_model("resnet18", (3, 32, 32), 10, stem=PRETRAINED_SMALL_STEM, weights=path)
    assert str(small) == str(pretrained)
    assert torch.equal(small.conv1.weight, saved["conv1.weight"])
    large = create_model("resnet18", (3, 96, 128), 10, weights=str(path))
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)
    assert not hasattr(large, "upsample")
    assert create_model("resnet18", (3, 32, 32), 10).conv1.kernel_size == (3, 3)  # no weights


# --- the stems ----------------------------------------------------------------------------------


def conv1_inputs(model: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Size, torch.Tensor]:
    """(the size conv1 sees, the logits) for a batch of 2 random images of `shape`."""
    seen = []
    hook = model.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    hook.remove()
    return seen[0], out


@pytest.mark.parametrize("size", [(32, 32), (28, 32)])
def test_stride1_keeps_full_resolution_with_the_7x7_conv1(weights, size):
    path, saved = weights
    model = create_model("resnet18", (3, 32, 32), 10, stem="stride1", weights=str(path))
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (7, 7)
    assert isinstance(model.maxpool, nn.Identity)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    seen, out = conv1_inputs(model, (3, *size))
    assert seen[-2:] == size and out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("size, upsampled", [((32, 32), (96, 96)), ((28, 32), (96, 110)),
                                             ((120, 100), (120, 100))])  # fmt: skip
def test_upsample_resizes_the_shorter_side_to_96_first(weights, size, upsampled):
    path, _ = weights
    model = create_model("resnet18", (3, 32, 32), 10, stem="upsample", weights=str(path))
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, nn.MaxPool2d)
    seen, out = conv1_inputs(model, (3, *size))
    assert seen[-2:] == upsampled and out.shape == (2, 10) and torch.isfinite(out).all()


def test_upsample_is_bilinear_without_aligned_corners():
    model = create_model("resnet18", (3, 32, 32), 10, stem="upsample")
    images = torch.rand(1, 3, 28, 32)
    expected = nn.functional.interpolate(
        images, size=(96, 110), mode="bilinear", align_corners=False
    )
    assert torch.equal(model.upsample(images), expected)


@pytest.mark.parametrize("stem", ["stride1", "upsample", "imagenet", "small"])
def test_stems_without_weights_train_everything_and_count_their_parameters(stem):
    model = create_model("resnet18", (1, 28, 28), 10, stem=stem)
    total = sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert total == parameters("resnet18", (1, 28, 28), 10, stem=stem)
    assert conv1_inputs(model, (1, 28, 28))[1].shape == (2, 10)


def test_grey_images_with_the_stride1_stem_sum_the_rgb_conv1(weights, notes):
    path, saved = weights
    model = create_model("resnet18", (1, 28, 28), 10, stem="stride1", weights=str(path))
    assert torch.allclose(model.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert "conv1 summed over its 3 colours" in notes[0]


# --- what is said -------------------------------------------------------------------------------


def test_the_note_says_what_was_loaded_and_that_the_head_is_new(weights, notes):
    path, _ = weights
    create_model("resnet18", (3, 32, 32), 10, stem="stride1", weights=str(path))
    assert notes == [
        f"weights {path}: 120 tensors loaded into the backbone; its head (fc, 1000 classes)"
        " replaced by a new 10-class head"
    ]


def test_a_file_without_a_head_is_said_too(weights, tmp_path, notes):
    _, saved = weights
    torch.save({k: v for k, v in saved.items() if not k.startswith("fc.")}, tmp_path / "b.pt")
    create_model("resnet18", (3, 32, 32), 3, stem="stride1", weights=str(tmp_path / "b.pt"))
    said = "120 tensors loaded into the backbone; the file has no head (fc): a new 3-class head"
    assert notes[0].endswith(said)


def test_a_model_file_of_loadbench_train_is_weights(store_32px, weights, tmp_path, notes):
    """Pretrain with `loadbench train`, then transfer from its model.pt."""
    out = tmp_path / "pretrain"
    config = TrainConfig(
        data=store_32px.path,
        model="resnet18",
        stem="imagenet",
        epochs=1,
        batch_size=32,
        out=str(out),
    )
    pretrained = train(config).model.net.state_dict()
    model = create_model("resnet18", (3, 32, 32), 7, stem="stride1", weights=out / "model.pt")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.items() if not k.startswith("fc."))
    assert "its head (fc, 4 classes) replaced by a new 7-class head" in notes[-1]


# --- errors -------------------------------------------------------------------------------------


def test_the_small_stem_with_weights_is_an_error(weights):
    path, _ = weights
    with pytest.raises(LoadbenchError) as error:
        create_model("resnet18", (3, 32, 32), 10, stem="small", weights=str(path))
    message = str(error.value)
    assert "cannot use the 7x7 conv1 of weights file" in message and "\n" not in message
    assert "imagenet, stride1, upsample or auto" in message


def test_a_frozen_backbone_needs_weights():
    message = "--freeze-backbone without --weights .* give --weights FILE .*, or do not freeze"
    for stem in ("auto", "stride1", "small"):
        with pytest.raises(LoadbenchError, match=message):
            create_model("resnet18", (3, 32, 32), 10, freeze_backbone=True, stem=stem)


def test_every_tensor_of_the_file_must_fit(weights, tmp_path):
    _, saved = weights
    cases = {
        "missing": ({k: v for k, v in saved.items() if not k.startswith("layer2.1.")},
                    r"the file lacks 10 tensors: layer2\.1\.conv1\.weight, "),
        "shape": ({**saved, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
                  r"1 tensor of another shape: layer1\.0\.conv1\.weight \(file \(64, 64, 1, 1\),"
                  r" model \(64, 64, 3, 3\)\)"),
        "extra": ({**saved, "layer5.0.conv1.weight": torch.zeros(3)},
                  r"1 tensor the model lacks: layer5\.0\.conv1\.weight\."),
    }  # fmt: skip
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(LoadbenchError, match=message) as error:
            create_model("resnet18", (3, 32, 32), 10, weights=str(tmp_path / f"{name}.pt"))
        assert f"{name}.pt does not fit resnet18" in str(error.value)
        assert "\n" not in str(error.value)


def test_rgb_weights_do_not_fit_another_channel_count(weights):
    path, _ = weights
    message = r"conv1\.weight \(file \(64, 3, 7, 7\), model \(64, 4, 7, 7\)\)"
    with pytest.raises(LoadbenchError, match=message):
        create_model("resnet18", (4, 32, 32), 10, stem="stride1", weights=str(path))


# --- the model file of a transfer run --------------------------------------------------------


@pytest.mark.parametrize("stem", ["auto", "stride1"])
def test_a_transfer_runs_model_file_predicts_like_the_run(store_32px, weights, tmp_path, stem):
    """model.pt records the architecture the weights went into (the stem chosen with them),
    not the weights file or the freezing: it loads and predicts without them."""
    from loadbench.training.checkpoint import load_model

    path, _ = weights
    config = TrainConfig(data=store_32px.path, model="resnet18", weights=str(path),
                         freeze_backbone=True, stem=stem, epochs=1, batch_size=32,
                         out=str(tmp_path / "run"))  # fmt: skip
    result = train(config)
    model, meta = load_model(str(tmp_path / "run" / "model.pt"))
    assert meta["model_options"]["weights"] is None
    assert meta["model_options"]["stem"] == (PRETRAINED_SMALL_STEM if stem == "auto" else stem)
    images = torch.rand(3, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), result.model(images))
