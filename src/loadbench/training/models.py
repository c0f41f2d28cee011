"""Image classifiers by name: a registry of small builders and one factory, `create_model`.

Every model takes (C, H, W) inputs and returns LOGITS (softmax is applied at prediction time, and
the loss takes logits). Each model declares its options (`Option`s) where it is registered;
values may arrive as strings from the CLI or YAML ("20,40,80", "true") and are typed and checked
in one place, `resolve_model_options`, so builders get clean input. torch is imported by the
builders only (`nets.py`, `pretrained.py`), so listing models and building the command line
stay light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.options import Option, as_int, as_list, show

Builder = Callable[..., Any]  # (input_shape, classes, **options) -> torch.nn.Module
ACTIVATION_NAMES = ("relu", "sigmoid", "selu")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, one line for `loadbench models`, and its options."""

    name: str
    summary: str
    options: dict[str, Option]
    builder: Builder = field(repr=False, compare=False)
    # True, or a function of the resolved options, when the model takes inputs of any H x W.
    any_size: bool | Callable[[dict[str, Any]], bool] = field(default=False, repr=False)


_MODELS: dict[str, ModelSpec] = {}


# --- option values that a type does not describe ------------------------------------------------


def _positive_ints(value: Any, allow_empty: bool = False) -> tuple[int, ...]:
    numbers = tuple(as_int(v) for v in as_list(value))
    if not numbers and not allow_empty:
        raise ValueError("needs at least one value, e.g. 20,40")
    return numbers


def _rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number in [0, 1)") from None
    if isinstance(value, bool) or not 0.0 <= rate < 1.0:
        raise ValueError("must be a number in [0, 1)")
    return rate


def _rates(value: Any) -> float | tuple[float, ...]:
    """One dropout rate for every layer, or one rate per layer ("0.1,0.2,0.3,0.4")."""
    rates = tuple(_rate(v) for v in as_list(value))
    if not rates:
        raise ValueError("needs a rate in [0, 1), or one rate per layer")
    return rates[0] if len(rates) == 1 else rates


def _optional_path(value: Any) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return os.fspath(value)


# --- the registry --------------------------------------------------------------------------------


def register_model(
    name: str,
    summary: str,
    options: dict[str, Option] | None = None,
    any_size: bool | Callable[[dict[str, Any]], bool] = False,
) -> Callable[[Builder], Builder]:
    """Register `builder(input_shape, classes, **options) -> nn.Module` under `name`."""

    def decorate(builder: Builder) -> Builder:
        _MODELS[name] = ModelSpec(name, summary, dict(options or {}), builder, any_size)
        return builder

    return decorate


def _spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        known = ", ".join(_MODELS)
        raise LoadbenchError(f"unknown model {name!r}; choose one of: {known}")
    return _MODELS[name]


def list_models() -> list[ModelSpec]:
    """Every registered model, in registration order."""
    return list(_MODELS.values())


def model_options() -> dict[str, dict[str, Option]]:
    """{model: {option: Option}} of every model: the declarations the CLI and configs use."""
    return {spec.name: spec.options for spec in _MODELS.values()}


def model_defaults(name: str) -> dict[str, Any]:
    """The default options of model `name` (a copy: change it freely)."""
    return {key: option.default for key, option in _spec(name).options.items()}


def resolve_model_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of model `name` updated with `options`, every value parsed and checked.

    Option names may use dashes as on the command line (`batch-norm` = `batch_norm`).
    """
    spec = _spec(name)
    resolved = model_defaults(name)
    for key, value in (options or {}).items():
        key = key.replace("-", "_")
        if key not in spec.options:
            takes = ", ".join(spec.options) or "no options"
            raise LoadbenchError(
                f"model {name!r} has no option {key!r}; it takes: {takes} (see `loadbench models`)"
            )
        resolved[key] = value
    for key, value in resolved.items():
        try:
            resolved[key] = _coerce(spec.options[key], value)
        except ValueError as e:
            raise LoadbenchError(f"model {name!r} option {key}={value!r}: {e}") from None
    return resolved


def _coerce(option: Option, value: Any) -> Any:
    if option.choices is not None and isinstance(value, str):
        value = value.strip().lower()  # `ReLU` is relu
    return option.coerce(value)


def _check_shape(input_shape: Any, classes: Any) -> tuple[tuple[int, int, int], int]:
    try:
        shape = tuple(as_int(n) for n in input_shape)
        classes = as_int(classes)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3:
        raise LoadbenchError(
            f"a model needs an input shape (channels, height, width) of positive numbers and at"
            f" least 1 class; got input_shape={input_shape!r}, classes={classes!r}"
        )
    return shape, classes


def create_model(name: str, input_shape: tuple[int, int, int], classes: int, **options: Any):
    """Build model `name` for (C, H, W) inputs and `classes` outputs (logits).

    Unset options take the model's defaults; an unknown model, an option the model does not take
    or a bad value raises LoadbenchError.
    """
    spec = _spec(name)
    shape, classes = _check_shape(input_shape, classes)
    return spec.builder(shape, classes, **resolve_model_options(name, options))


def accepts_any_size(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether model `name` with `options` takes inputs of any height and width."""
    spec = _spec(name)
    if callable(spec.any_size):
        return bool(spec.any_size(resolve_model_options(name, options)))
    return spec.any_size


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) number of parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def options_text(options: Mapping[str, Any]) -> str:
    """Options as `key=value` pairs in the form the CLI accepts back (`widths=20,40`)."""
    return " ".join(f"{key}={show(value)}" for key, value in options.items())


def models_table(
    input_shape: tuple[int, int, int], classes: int
) -> list[tuple[str, str, int, str]]:
    """(name, summary, parameters with default options, option defaults) for every model.

    The parameter count is 0 for a model that cannot take `input_shape` (cnn-tiny below 8x8).
    """
    import torch

    rows = []
    for spec in list_models():
        # On the meta device parameters have shapes but no memory: an mlp on 512x512 images
        # would otherwise allocate gigabytes just to be counted.
        try:
            with torch.device("meta"):
                total = count_parameters(create_model(spec.name, input_shape, classes))[0]
        except LoadbenchError:
            total = 0
        rows.append((spec.name, spec.summary, total, options_text(model_defaults(spec.name))))
    return rows


# --- models --------------------------------------------------------------------------------------

DROPOUT_HELP = "one dropout rate, or one per {unit}: 0.1,0.2,0.3,0.4"


@register_model(
    "cnn-tiny",
    summary="doc 004's minimal net: 2 sigmoid convs, 8x8 max-pool, linear; inputs in [0, 1]",
    options={"filters": Option(5, "filters per conv", kind=int, minimum=1)},
)
def cnn_tiny(input_shape: tuple[int, int, int], classes: int, **options: Any):
    from loadbench.training import nets

    return nets.cnn_tiny(input_shape, classes, **options)


@register_model(
    "cnn-blocks",
    summary="conv-conv-pool blocks (doc 004), optional batch norm and dropout, GAP or flatten head",
    options={
        "widths": Option((20, 40, 80, 160), "filters per block", parse=_positive_ints),
        "activation": Option("relu", "activation", choices=ACTIVATION_NAMES),
        "batch_norm": Option(False, "batch norm after every conv", kind=bool),
        "dropout": Option(0.0, DROPOUT_HELP.format(unit="block"), parse=_rates),
        "pool": Option(2, "max-pool size per block", kind=int, minimum=1),
        "head": Option("gap", "head (gap: any image size)", choices=("gap", "flatten")),
    },
    any_size=lambda options: options["head"] == "gap",
)
def cnn_blocks(input_shape: tuple[int, int, int], classes: int, **options: Any):
    from loadbench.training import nets

    return nets.cnn_blocks(input_shape, classes, **options)


@register_model(
    "mlp",
    summary="flattened pixels through ReLU hidden layers: the no-convolution baseline",
    options={
        "hidden": Option(
            (512, 256), "hidden layer widths", parse=lambda v: _positive_ints(v, allow_empty=True)
        ),
        "dropout": Option(0.0, DROPOUT_HELP.format(unit="hidden layer"), parse=_rates),
    },
)
def mlp(input_shape: tuple[int, int, int], classes: int, **options: Any):
    from loadbench.training import nets

    return nets.mlp(input_shape, classes, **options)


RESNET_OPTIONS = {
    "weights": Option(None, "a local state-dict file of pretrained weights", parse=_optional_path),
    "freeze_backbone": Option(False, "train only the new head", kind=bool),
    "stem": Option(
        "auto", "first layer (auto: small under 96 px)", choices=("auto", "imagenet", "small")
    ),
}


def _resnet(arch: str) -> Builder:
    def build(input_shape: tuple[int, int, int], classes: int, **options: Any):
        from loadbench.training.pretrained import build_resnet

        return build_resnet(arch, input_shape, classes, **options)

    return build


for _arch, _layers in (("resnet18", 18), ("resnet50", 50)):
    register_model(
        _arch,
        summary=f"torchvision ResNet-{_layers}, new head; local pretrained weights, frozen "
        "backbone optional",
        options=RESNET_OPTIONS,
        any_size=True,
    )(_resnet(_arch))
