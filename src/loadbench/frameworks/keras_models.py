"""The built-in networks (cnn-tiny, cnn-blocks, mlp) in Keras 3, layer for layer the torch ones of
`training/nets.py`: the same options (declared and checked in `training/models.py`), the same
parameters, the same initialisation, and the same input, so a Keras run and a torch run differ in
the framework alone.

- Input: float32 N,C,H,W in [0, 1], as torch's; a `Permute` to N,H,W,C inside the model, since
  Keras' convolutions run channels-last on the CPU (channels-first conv2d is GPU-only there).
- Normalisation: the training set's per-channel mean and std, fixed, inside the model (torch's
  `Classifier`); left out where torch's run leaves it out (cnn-tiny, unless `normalize`).
- Flattening heads flatten in torch's (C, H, W) order (a `Permute` back first), so a weight of
  one framework's dense layer is the same weight of the other's: the nets are interchangeable,
  which the tests check output for output.
- Initialisation: torch's defaults (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases),
  not Keras' Glorot, so both start from the same distribution.
- Batch norm: torch's epsilon (1e-5) and momentum (0.1, which Keras writes 0.9).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.training import blocks
from loadbench.training.models import resolve_model_options

Builder = Callable[..., Any]  # (keras, x N,H,W,C or N,C,H,W, input_shape, classes, **options)
_BUILDERS: dict[str, tuple[Builder, bool]] = {}  # name -> (builder, takes channels-last input)


def _keras_model(name: str, channels_last: bool = True) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        _BUILDERS[name] = (builder, channels_last)
        return builder

    return decorate


def keras_model_names() -> tuple[str, ...]:
    """The models a Keras run can train."""
    return tuple(_BUILDERS)


def check_keras_model(name: str) -> None:
    """LoadbenchError unless model `name` has a Keras network (said before TensorFlow loads)."""
    if name not in _BUILDERS:
        raise LoadbenchError(
            f"model {name!r} has no Keras version; --framework keras trains "
            f"{', '.join(_BUILDERS)} (or train {name} with --framework torch)"
        )


def create_keras_model(keras, name: str, input_shape: tuple[int, int, int], classes: int, *,
                       mean: list[float] | None = None, std: list[float] | None = None,
                       **options: Any):  # fmt: skip
    """Model `name` for float32 N,C,H,W inputs in [0, 1] and `classes` logits, normalised by
    `mean` and `std` (per channel) inside the model when they are given.

    Options are the torch model's (`training/models.py`), checked there."""
    check_keras_model(name)
    builder, channels_last = _BUILDERS[name]
    resolved = resolve_model_options(name, options)
    c, h, w = (int(n) for n in input_shape)
    inputs = keras.Input((c, h, w), name="images")
    x = inputs
    if channels_last:
        x = keras.layers.Permute((2, 3, 1), name="to_channels_last")(x)
    if mean is not None and std is not None:
        x = keras.layers.Normalization(
            axis=-1 if channels_last else 1, mean=list(mean), variance=[s * s for s in std],
            name="normalize",
        )(x)  # fmt: skip
    outputs = builder(keras, x, (c, h, w), int(classes), **resolved)
    return keras.Model(inputs, outputs, name=name)


def keras_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameters as torch counts them: Keras' weights without batch norm's
    moving statistics, which torch keeps as buffers, not parameters."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    frozen = sum(
        math.prod(w.shape)
        for w in model.non_trainable_weights
        if not w.path.endswith(("moving_mean", "moving_variance"))
    )
    return trainable + frozen, trainable


# -- layers ------------------------------------------------------------------------------------


def _torch_init(keras, fan_in: int) -> dict[str, Any]:
    """torch's default initialisation of Conv2d and Linear: kaiming_uniform(a=sqrt(5)) for the
    weight, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def _conv(keras, x, filters: int, activation: str | None = None, bias: bool = True):
    fan_in = int(x.shape[-1]) * 9
    return keras.layers.Conv2D(filters, 3, padding="same", use_bias=bias, activation=activation,
                               **_torch_init(keras, fan_in))(x)  # fmt: skip


def _dense(keras, x, units: int, activation: str | None = None):
    return keras.layers.Dense(units, activation=activation,
                              **_torch_init(keras, int(x.shape[-1])))(x)  # fmt: skip


def _flatten_as_torch(keras, x):
    """N,H,W,C flattened in torch's (C, H, W) order."""
    return keras.layers.Flatten()(keras.layers.Permute((3, 1, 2))(x))


def _block(keras, x, width: int, activation: str, batch_norm: bool, rate: float, pool: int):
    """conv3x3 [+BN] + act, twice, max-pool when the image is still as large as the pool,
    [dropout]: `nets.conv_block`."""
    for _ in range(2):
        x = _conv(keras, x, width, bias=not batch_norm)
        if batch_norm:
            x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        x = keras.layers.Activation(activation)(x)
    h, w = int(x.shape[1]), int(x.shape[2])
    if blocks.pooled_size(h, w, pool, 1) != (h, w):  # sizes are static: decided once, here
        x = keras.layers.MaxPooling2D(pool)(x)
    if rate > 0:
        x = keras.layers.Dropout(rate)(x)
    return x


# -- networks ----------------------------------------------------------------------------------


@_keras_model("cnn-tiny")
def _cnn_tiny(keras, x, input_shape: tuple[int, int, int], classes: int, filters: int):
    blocks.check_tiny(*input_shape[1:])
    x = _conv(keras, x, filters, "sigmoid")
    x = _conv(keras, x, filters, "sigmoid")
    x = keras.layers.MaxPooling2D(8)(x)
    return _dense(keras, _flatten_as_torch(keras, x), classes)


@_keras_model("cnn-blocks")
def _cnn_blocks(keras, x, input_shape: tuple[int, int, int], classes: int, *, widths, activation,
                batch_norm: bool, dropout, pool: int, head: str):  # fmt: skip
    rates = blocks.cnn_blocks_rates(widths, dropout)
    for width, rate in zip(widths, rates, strict=True):
        x = _block(keras, x, width, activation, batch_norm, rate, pool)
    gap = head == "gap"
    x = keras.layers.GlobalAveragePooling2D()(x) if gap else _flatten_as_torch(keras, x)
    return _dense(keras, x, classes)


@_keras_model("mlp", channels_last=False)  # flattens N,C,H,W as torch does: no permute at all
def _mlp(keras, x, input_shape: tuple[int, int, int], classes: int, *, hidden, dropout):
    x = keras.layers.Flatten()(x)
    for size, rate in zip(hidden, blocks.mlp_rates(hidden, dropout), strict=True):
        x = _dense(keras, x, size, "relu")
        if rate > 0:
            x = keras.layers.Dropout(rate)(x)
    return _dense(keras, x, classes)
