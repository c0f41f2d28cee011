"""The model registry: every registered model builds and runs; options do what they say."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loadbench.errors import LoadbenchError
from loadbench.training.models import (
    accepts_any_size,
    count_parameters,
    create_model,
    list_models,
    model_defaults,
    models_table,
    options_text,
)
from loadbench.training.nets import MaxPoolIfLarger, conv_block

MODEL_NAMES = [spec.name for spec in list_models()]


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def run(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.rand(batch, *shape))


# --- every registered model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_logits_per_class(name):
    model = create_model(name, (3, 16, 16), 4)
    out = run(model, (3, 16, 16))
    assert out.shape == (2, 4)
    assert torch.isfinite(out).all()
    assert count_parameters(model)[0] > 0
    # Logits: softmax belongs to prediction, and the loss expects raw scores.
    assert count(model, nn.Softmax) == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_defaults_written_as_cli_text_build_the_same_model(name):
    """`loadbench models` shows options as text; that text given back builds the same model."""
    text = options_text(model_defaults(name))
    given = dict(pair.split("=", 1) for pair in text.split())
    with torch.device("meta"):
        a = create_model(name, (1, 16, 16), 3)
        b = create_model(name, (1, 16, 16), 3, **given)
    assert count_parameters(a) == count_parameters(b)
    assert str(a) == str(b)


def test_model_defaults_is_a_copy():
    defaults = model_defaults("cnn-tiny")
    defaults["filters"] = 99
    assert model_defaults("cnn-tiny") == {"filters": 5}


# --- cnn-tiny ------------------------------------------------------------------------------------


def test_cnn_tiny_has_the_parameters_counted_by_hand():
    # conv 3->5: 3*9*5 + 5 = 140; conv 5->5: 5*9*5 + 5 = 230; dense 5*4*4 -> 10: 80*10 + 10 = 810
    model = create_model("cnn-tiny", (3, 32, 32), 10)
    assert count_parameters(model) == (1180, 1180)
    # 20 filters: 3*9*20 + 20 = 560; 20*9*20 + 20 = 3620; 20*4*4*10 + 10 = 3210
    assert count_parameters(create_model("cnn-tiny", (3, 32, 32), 10, filters="20"))[0] == 7390


def test_cnn_tiny_is_doc_004s_net():
    model = create_model("cnn-tiny", (3, 32, 32), 10)
    assert count(model, nn.Sigmoid) == 2
    assert [m.kernel_size for m in model.modules() if isinstance(m, nn.MaxPool2d)] == [8]
    assert not accepts_any_size("cnn-tiny")


def test_cnn_tiny_needs_8x8():
    with pytest.raises(LoadbenchError, match="at least 8x8"):
        create_model("cnn-tiny", (1, 7, 32), 10)


def test_cnn_tiny_rejects_another_size_in_words():
    model = create_model("cnn-tiny", (3, 32, 32), 10)
    with pytest.raises(LoadbenchError, match="built for 3x32x32"):
        run(model, (3, 16, 16))


# --- cnn-blocks ----------------------------------------------------------------------------------


def test_cnn_blocks_is_made_of_conv_blocks():
    model = create_model("cnn-blocks", (3, 32, 32), 10)
    widths = model_defaults("cnn-blocks")["widths"]
    assert widths == (20, 40, 80, 160)
    assert count(model, nn.Conv2d) == 2 * len(widths)
    blocks = [m for m in model if isinstance(m, nn.Sequential)]
    expected = [
        conv_block(i, o, "relu", False, 0.0, 2)
        for i, o in zip((3, *widths[:-1]), widths, strict=True)
    ]
    assert [str(b) for b in blocks] == [str(b) for b in expected]
    assert count(create_model("cnn-blocks", (3, 32, 32), 10, widths="20,40"), nn.Conv2d) == 4


def test_cnn_blocks_batch_norm_after_every_conv():
    model = create_model("cnn-blocks", (3, 32, 32), 10, batch_norm="true")
    assert count(model, nn.BatchNorm2d) == 8
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert count(create_model("cnn-blocks", (3, 32, 32), 10), nn.BatchNorm2d) == 0


def test_cnn_blocks_dropout_one_rate_or_one_per_block():
    def rates(model):
        return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]

    assert rates(create_model("cnn-blocks", (3, 32, 32), 10)) == []
    per_block = create_model("cnn-blocks", (3, 32, 32), 10, dropout="0.1,0.2,0.3,0.4")
    assert rates(per_block) == [0.1, 0.2, 0.3, 0.4]
    assert rates(create_model("cnn-blocks", (3, 32, 32), 10, dropout="0.25")) == [0.25] * 4
    assert rates(create_model("cnn-blocks", (3, 32, 32), 10, dropout=[0.5, 0.1], widths=[8, 8]))
    with pytest.raises(LoadbenchError, match="4 blocks .* 3 dropout rates"):
        create_model("cnn-blocks", (3, 32, 32), 10, dropout="0.1,0.2,0.3")


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 28, 32), (3, 64, 64), (3, 5, 300)])
def test_cnn_blocks_gap_head_takes_any_size(shape):
    model = create_model("cnn-blocks", shape, 7)
    assert run(model, shape, batch=3).shape == (3, 7)
    assert accepts_any_size("cnn-blocks", {"head": "gap"})


def test_cnn_blocks_trained_on_32x32_predicts_a_non_square_image():
    model = create_model("cnn-blocks", (3, 32, 32), 10, batch_norm=True).eval()
    assert run(model, (3, 28, 32), batch=1).shape == (1, 10)


def test_pooling_never_shrinks_below_1x1():
    pool = MaxPoolIfLarger(2)
    x = torch.zeros(1, 1, 8, 8)
    for expected in (4, 2, 1, 1):
        x = pool(x)
        assert x.shape[-2:] == (expected, expected)
    assert pool(torch.zeros(1, 1, 1, 9)).shape[-2:] == (1, 9)


def test_cnn_blocks_flatten_head_is_fixed_to_its_input_size():
    model = create_model("cnn-blocks", (3, 32, 32), 10, head="flatten")
    assert not accepts_any_size("cnn-blocks", {"head": "flatten"})
    assert run(model, (3, 32, 32)).shape == (2, 10)
    # 32 -> 2x2 after 4 pools: the head sees 160 * 2 * 2 features.
    assert model[-1].in_features == 160 * 2 * 2
    with pytest.raises(LoadbenchError, match="--head gap"):
        run(model, (3, 28, 32))


def test_cnn_blocks_flatten_head_on_a_small_image():
    model = create_model("cnn-blocks", (1, 8, 8), 10, head="flatten")
    assert model[-1].in_features == 160
    assert run(model, (1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("activation, kind", [("sigmoid", nn.Sigmoid), ("SELU", nn.SELU)])
def test_cnn_blocks_activation(activation, kind):
    model = create_model("cnn-blocks", (3, 16, 16), 10, activation=activation)
    assert count(model, kind) == 8
    assert count(model, nn.ReLU) == 0


# --- mlp -----------------------------------------------------------------------------------------


def test_mlp_layers_and_parameters():
    model = create_model("mlp", (3, 32, 32), 10)
    assert count_parameters(model)[0] == (3072 * 512 + 512) + (512 * 256 + 256) + (256 * 10 + 10)
    assert run(model, (3, 32, 32)).shape == (2, 10)
    linear = create_model("mlp", (1, 8, 8), 3, hidden="")
    assert count_parameters(linear)[0] == 64 * 3 + 3
    dropped = create_model("mlp", (1, 8, 8), 3, hidden="16,8", dropout="0.5,0.25")
    assert [m.p for m in dropped.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.25]


def test_mlp_rejects_another_size_in_words():
    model = create_model("mlp", (3, 32, 32), 10)
    assert not accepts_any_size("mlp")
    with pytest.raises(LoadbenchError, match="built for 3x32x32 .* got 3x28x32"):
        run(model, (3, 28, 32))


# --- resnets -------------------------------------------------------------------------------------


def test_resnet18_small_stem_for_small_images():
    model = create_model("resnet18", (3, 32, 32), 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10
    assert accepts_any_size("resnet18") and accepts_any_size("resnet50")
    with torch.device("meta"):
        assert create_model("resnet18", (3, 96, 96), 10).conv1.kernel_size == (7, 7)
        forced = create_model("resnet18", (3, 32, 32), 10, stem="imagenet")
        assert forced.conv1.kernel_size == (7, 7)
        grey = create_model("resnet50", (1, 224, 224), 10)
    assert grey.conv1.weight.shape == (64, 1, 7, 7)


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
    """A ResNet-18 state dict as torchvision saves one: 1000 classes, ImageNet stem."""
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pt"
    torch.save(state, path)
    return path, state


def test_resnet18_frozen_backbone_trains_only_the_head(imagenet_weights):
    path, _ = imagenet_weights
    model = create_model("resnet18", (3, 32, 32), 10, weights=str(path), freeze_backbone="true")
    total, trainable = count_parameters(model)
    assert trainable == 512 * 10 + 10 < total
    assert all(p.requires_grad == n.startswith("fc.") for n, p in model.named_parameters())


def test_resnet18_loads_backbone_weights_with_a_new_head(imagenet_weights):
    path, saved = imagenet_weights
    model = create_model("resnet18", (3, 32, 32), 10, stem="imagenet", weights=str(path))
    state = model.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(state[key], saved[key])
    assert model.fc.out_features == 10


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module."])
def test_resnet18_weights_from_a_training_checkpoint(imagenet_weights, tmp_path, wrap):
    path, saved = imagenet_weights
    if wrap == "module.":
        content = {f"module.{k}": v for k, v in saved.items()}
    else:
        content = {wrap: saved, "epoch": 3}
    torch.save(content, tmp_path / "checkpoint.pt")
    model = create_model("resnet18", (3, 32, 32), 10, weights=tmp_path / "checkpoint.pt")
    assert torch.equal(model.state_dict()["layer2.0.conv2.weight"], saved["layer2.0.conv2.weight"])


def test_resnet18_auto_stem_with_weights_keeps_the_files_conv1(imagenet_weights):
    """Small images with weights: a stem that uses the file's 7x7 conv1, never a fresh one."""
    path, saved = imagenet_weights
    model = create_model("resnet18", (3, 32, 32), 10, weights=str(path))  # auto
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("fc."))
    assert run(model, (3, 32, 32)).shape == (2, 10)


def test_resnet18_grey_input_sums_rgb_conv1(imagenet_weights):
    path, saved = imagenet_weights
    model = create_model("resnet18", (1, 64, 64), 5, stem="imagenet", weights=str(path))
    expected = saved["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.conv1.weight, expected)
    assert run(model, (1, 64, 64)).shape == (2, 5)


def test_resnet18_partial_weights_are_an_error_naming_what_is_missing(imagenet_weights, tmp_path):
    _, saved = imagenet_weights
    torch.save({k: v for k, v in saved.items() if not k.startswith("layer4.")}, tmp_path / "p.pt")
    with pytest.raises(LoadbenchError, match=r"p\.pt does not fit .*lacks 25 tensors: layer4\.\*"):
        create_model("resnet18", (3, 32, 32), 10, weights=str(tmp_path / "p.pt"))
    one_less = {k: v for k, v in saved.items() if k != "layer3.1.bn2.running_var"}
    torch.save(one_less, tmp_path / "q.pt")
    with pytest.raises(LoadbenchError, match=r"lacks 1 tensor: layer3\.1\.bn2\.running_var\."):
        create_model("resnet18", (3, 32, 32), 10, weights=str(tmp_path / "q.pt"))


def test_resnet18_bad_weights_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(LoadbenchError, match="garbage.pt"):
        create_model("resnet18", (3, 32, 32), 10, weights=str(garbage))
    with pytest.raises(LoadbenchError, match="missing.pt does not exist"):
        create_model("resnet18", (3, 32, 32), 10, weights=str(tmp_path / "missing.pt"))
    other = tmp_path / "cnn.pt"
    torch.save(create_model("cnn-blocks", (3, 32, 32), 10).state_dict(), other)
    with pytest.raises(LoadbenchError, match=r"cnn\.pt does not fit resnet18 .* lacks .*conv1"):
        create_model("resnet18", (3, 32, 32), 10, weights=str(other))
    not_tensors = tmp_path / "numbers.pt"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(LoadbenchError, match="numbers.pt holds no state dict"):
        create_model("resnet18", (3, 32, 32), 10, weights=str(not_tensors))


# --- errors for a person -------------------------------------------------------------------------


def test_unknown_model_lists_the_models():
    with pytest.raises(LoadbenchError, match="unknown model 'vgg'.*cnn-tiny, cnn-blocks, mlp"):
        create_model("vgg", (3, 32, 32), 10)
    with pytest.raises(LoadbenchError, match="unknown model"):
        model_defaults("vgg")


def test_unknown_option_names_option_model_and_its_options():
    with pytest.raises(
        LoadbenchError, match="'cnn-tiny' has no option 'widths'; it takes: filters"
    ):
        create_model("cnn-tiny", (3, 32, 32), 10, widths="20,40")


def test_dashed_option_names_are_accepted():
    model = create_model("cnn-blocks", (3, 16, 16), 10, **{"batch-norm": "yes"})
    assert count(model, nn.BatchNorm2d) == 8


@pytest.mark.parametrize(
    "options, message",
    [
        ({"activation": "tanh"}, "activation='tanh': must be one of relu|sigmoid|selu"),
        ({"dropout": 1.0}, r"dropout=1.0: must be a number in \[0, 1\)"),
        ({"dropout": "0.1,-0.2"}, r"must be a number in \[0, 1\)"),
        ({"widths": "20,0"}, "widths='20,0': must be at least 1"),
        ({"widths": "20,4.5"}, "must be a whole number"),
        ({"widths": ""}, "needs at least one value"),
        ({"batch_norm": "maybe"}, "must be true or false"),
        ({"head": "dense"}, "must be one of gap|flatten"),
        ({"pool": 0}, "must be at least 1"),
    ],
)
def test_bad_option_values(options, message):
    with pytest.raises(LoadbenchError, match=message):
        create_model("cnn-blocks", (3, 32, 32), 10, **options)


def test_bad_shapes_and_classes():
    with pytest.raises(LoadbenchError, match="input shape"):
        create_model("mlp", (32, 32), 10)
    with pytest.raises(LoadbenchError, match="at least 1 class"):
        create_model("mlp", (3, 32, 32), 0)
    with pytest.raises(LoadbenchError, match="must be one of auto|imagenet|small"):
        create_model("resnet18", (3, 32, 32), 10, stem="tiny")


# --- the `loadbench models` table ----------------------------------------------------------------


def test_models_table():
    rows = {row[0]: row for row in models_table((3, 32, 32), 10)}
    assert list(rows) == MODEL_NAMES
    assert rows["cnn-tiny"][2:] == (1180, "filters=5")
    assert rows["cnn-blocks"][3] == (
        "widths=20,40,80,160 activation=relu batch_norm=false dropout=0.0 pool=2 head=gap"
    )
    assert rows["resnet18"][3] == "weights=none freeze_backbone=false stem=auto"
    assert all(row[1] and row[2] > 0 for row in rows.values())
    # Counted on the meta device: 512x512 images through the mlp allocate nothing.
    big = {row[0]: row[2] for row in models_table((3, 512, 512), 2)}
    assert big["mlp"] == 3 * 512 * 512 * 512 + 512 + 512 * 256 + 256 + 256 * 2 + 2
    assert {row[0]: row[2] for row in models_table((1, 4, 4), 2)}["cnn-tiny"] == 0


def test_initial_loss_is_near_ln_classes():
    """Doc 003: before the first update the loss is about ln(C); a wild start means a bad init."""
    for name in ("cnn-tiny", "cnn-blocks", "mlp"):
        model = create_model(name, (3, 32, 32), 10)
        out = run(model, (3, 32, 32), batch=16)
        loss = nn.functional.cross_entropy(out, torch.randint(0, 10, (16,)))
        assert abs(loss.item() - math.log(10)) < 0.5, name
