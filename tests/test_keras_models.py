"""The Keras networks are the torch ones: the same parameter counts for every option, and with
torch's weights copied in, the same logits; models without a Keras version are refused."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from loadbench.errors import LoadbenchError
from loadbench.training.checkpoint import Classifier
from loadbench.training.models import count_parameters, create_model, parameters

# Not importorskip: TensorFlow is imported through the tf-data peer only (see tf_runtime.py).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed"
)

CASES = [
    ("cnn-tiny", {}),
    ("cnn-tiny", {"filters": 7}),
    ("cnn-blocks", {}),
    ("cnn-blocks", {"batch_norm": True}),
    ("cnn-blocks", {"head": "flatten", "widths": "4,6"}),
    ("cnn-blocks", {"head": "flatten", "batch_norm": True, "widths": "5,3,6", "pool": 3}),
    ("cnn-blocks", {"widths": "8", "activation": "selu", "dropout": 0.2}),
    ("cnn-blocks", {"widths": "4,8", "activation": "sigmoid", "dropout": "0.1,0.3", "pool": 1}),
    ("mlp", {}),
    ("mlp", {"hidden": "9,4", "dropout": 0.5}),
    ("mlp", {"hidden": ""}),
]
SHAPES = [(1, 8, 8), (3, 16, 12)]


@pytest.fixture(scope="module")
def keras():
    from loadbench.frameworks.tf_runtime import import_keras

    return import_keras()[1]


def build(keras, name, shape, options, normalized=True):
    from loadbench.frameworks.keras_models import create_keras_model

    stats = {"mean": [0.2, 0.4, 0.5][: shape[0]], "std": [0.3, 0.2, 0.1][: shape[0]]}
    return create_keras_model(keras, name, shape, 10, **(stats if normalized else {}), **options)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "options"), CASES)
def test_parameter_counts_are_torchs(keras, name, options, shape):
    from loadbench.frameworks.keras_models import keras_parameters

    model = build(keras, name, shape, options)
    expected = count_parameters(create_model(name, shape, 10, **options))
    assert keras_parameters(model) == expected
    assert expected[0] == parameters(name, shape, 10, **options)


def copy_torch_weights(net: torch.nn.Module, model) -> None:
    """Every conv, batch norm and linear layer of `net` into the same layer of `model`, in
    order: a weight copied into a Keras layer of another shape raises."""
    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)
    theirs = [m for m in net.modules() if isinstance(m, kinds)]
    ours = [layer for layer in model.layers if layer.weights and layer.name != "normalize"]
    assert len(theirs) == len(ours)
    for module, layer in zip(theirs, ours, strict=True):
        if isinstance(module, torch.nn.BatchNorm2d):
            values = [module.weight, module.bias, module.running_mean, module.running_var]
        elif isinstance(module, torch.nn.Conv2d):  # O,I,kh,kw -> kh,kw,I,O
            values = [module.weight.permute(2, 3, 1, 0), module.bias]
        else:
            values = [module.weight.T, module.bias]
        layer.set_weights([v.detach().numpy() for v in values if v is not None])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "options"), CASES)
def test_with_torchs_weights_the_logits_are_torchs(keras, name, options, shape):
    """Layer order, flattening order, pooling and normalisation all agree (evaluation mode;
    batch-norm statistics made up, so that they count)."""
    torch.manual_seed(0)
    net = create_model(name, shape, 10, **options)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    mean, std = [0.2, 0.4, 0.5][: shape[0]], [0.3, 0.2, 0.1][: shape[0]]
    classifier = Classifier(net, mean, std).eval()
    model = build(keras, name, shape, options)
    copy_torch_weights(net, model)
    images = torch.rand(5, *shape)
    with torch.no_grad():
        expected = classifier(images).numpy()
    got = np.asarray(model(images.numpy(), training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_cnn_tiny_takes_the_image_as_it_is(keras):
    """No normalisation layer without statistics (torch's run gives cnn-tiny none)."""
    model = build(keras, "cnn-tiny", (1, 8, 8), {}, normalized=False)
    assert "normalize" not in [layer.name for layer in model.layers]
    assert build(keras, "cnn-tiny", (1, 8, 8), {}).get_layer("normalize") is not None


def test_the_initialisation_is_torchs(keras):
    """Weights and biases uniform in +-1/sqrt(fan_in), as torch's defaults draw them."""
    model = build(keras, "mlp", (1, 8, 8), {"hidden": "300"})
    kernel, bias = model.layers[-2].get_weights()  # 64 inputs -> bound 1/8
    for values in (kernel, bias):
        assert np.abs(values).max() <= 1 / 8
        assert np.abs(values).max() > 0.9 / 8


def test_the_same_seed_gives_the_same_weights(keras):
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        weights.append(build(keras, "cnn-blocks", (3, 16, 12), {"widths": "4,6"}).get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_models_without_a_keras_version_are_refused_by_name():
    from loadbench.frameworks.keras_models import check_keras_model, keras_model_names

    assert keras_model_names() == ("cnn-tiny", "cnn-blocks", "mlp")
    with pytest.raises(LoadbenchError, match="'resnet18' has no Keras version.*cnn-tiny, cnn-bl"):
        check_keras_model("resnet18")


def test_bad_options_are_the_torch_models_errors(keras):
    with pytest.raises(LoadbenchError, match="has no option 'filters'"):
        build(keras, "mlp", (1, 8, 8), {"filters": 3})
    with pytest.raises(LoadbenchError, match="2 blocks.*3 dropout rates"):
        build(keras, "cnn-blocks", (1, 8, 8), {"widths": "4,8", "dropout": "0.1,0.2,0.3"})
    with pytest.raises(LoadbenchError, match="at least 8x8"):
        build(keras, "cnn-tiny", (1, 7, 9), {})
