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
from loadbench.training import blocks

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
    # (input_shape, classes, **options) -> the number of parameters, without building it.
    parameters: Callable[..., int] | None = field(default=None, repr=False, compare=False)
    # (input_shape, options) -> the options that build the same network again without what
    # only training needs (pretrained weights, freezing): what a model file records.
    architecture: Callable[..., dict[str, Any]] | None = field(
        default=None, repr=False, compare=False
    )


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
    parameters: Callable[..., int] | None = None,
    architecture: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[Builder], Builder]:
    """Register `builder(input_shape, classes, **options) -> nn.Module` under `name`;
    `parameters(input_shape, classes, **options)` counts its parameters without building it;
    `architecture(input_shape, options)` gives the options that rebuild it for a model file."""

    def decorate(builder: Builder) -> Builder:
        _MODELS[name] = ModelSpec(name, summary, dict(options or {}), builder, any_size,
                                  parameters, architecture)  # fmt: skip
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


def architecture_options(name: str, input_shape: tuple[int, int, int],
                         options: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The options, as given, that build model `name`'s network again for a model file (the
    weights are then the file's own): e.g. a ResNet's stem as chosen with pretrained weights,
    without the weights file or the freezing."""
    spec = _spec(name)
    given = dict(options)
    return spec.architecture(input_shape, given) if spec.architecture is not None else given


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


def parameters(name: str, input_shape: tuple[int, int, int], classes: int,
               **options: Any) -> int:  # fmt: skip
    """The number of parameters of model `name` with `options`, counted without torch."""
    spec = _spec(name)
    shape, classes = _check_shape(input_shape, classes)
    return spec.parameters(shape, classes, **resolve_model_options(name, options))


def models_table(
    input_shape: tuple[int, int, int], classes: int, **options: Any
) -> list[tuple[str, str, int, str]]:
    """(name, summary, parameters, options) for every model: with `options` where the model
    takes them, its defaults otherwise. The count is 0 for a model that cannot take
    `input_shape` (cnn-tiny below 8x8). No network is built: `loadbench models` is instant."""
    rows = []
    for spec in list_models():
        own = {k: v for k, v in options.items() if k in spec.options}
        try:
            total = parameters(spec.name, input_shape, classes, **own)
        except LoadbenchError:
            if own:  # the options asked for are wrong for this model: say so
                raise
            total = 0
        rows.append((spec.name, spec.summary, total, options_text(resolve_options(spec, own))))
    return rows


def resolve_options(spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The model's options as `models_table` shows them (as given on the command line)."""
    return {**model_defaults(spec.name), **options}


# --- models --------------------------------------------------------------------------------------

DROPOUT_HELP = "one dropout rate, or one per {unit}: 0.1,0.2,0.3,0.4"


@register_model(
    "cnn-tiny",
    summary="doc 004's minimal net: 2 sigmoid convs, 8x8 max-pool, linear; inputs in [0, 1]",
    options={"filters": Option(5, "filters per conv", kind=int, minimum=1)},
    parameters=blocks.cnn_tiny_parameters,
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
    parameters=blocks.cnn_blocks_parameters,
)
def cnn_blocks(input_shape: tuple[int, int, int], classes: int, dropout, **options: Any):
    from loadbench.training import nets

    rates = blocks.cnn_blocks_rates(options["widths"], dropout)
    return nets.cnn_blocks(input_shape, classes, rates=rates, **options)


@register_model(
    "mlp",
    summary="flattened pixels through ReLU hidden layers: the no-convolution baseline",
    options={
        "hidden": Option(
            (512, 256), "hidden layer widths", parse=lambda v: _positive_ints(v, allow_empty=True)
        ),
        "dropout": Option(0.0, DROPOUT_HELP.format(unit="hidden layer"), parse=_rates),
    },
    parameters=blocks.mlp_parameters,
)
def mlp(input_shape: tuple[int, int, int], classes: int, hidden, dropout):
    from loadbench.training import nets

    return nets.mlp(input_shape, classes, hidden, blocks.mlp_rates(hidden, dropout))


# A stem is the ResNet's first layer. The ImageNet stem (7x7 conv at stride 2, then a stride-2
# max-pool) leaves a quarter of each side: below this size it throws away most of the image.
SMALL_IMAGE_BELOW = 96
# What `auto` gives images under SMALL_IMAGE_BELOW with pretrained weights: the winner of
# benchmarks/transfer_stem.py (96 px pretraining, frozen backbone, head trained at 32 px):
# upsample 0.39 test accuracy in both runs, stride1 0.28 and 0.31, and upsample is cheaper
# (layer1 sees 24x24, not 32x32).
PRETRAINED_SMALL_STEM = "upsample"
RESNET_STEMS = ("auto", "imagenet", "small", "stride1", "upsample")
# Stems whose conv1 is torchvision's 7x7: pretrained weights load into them whole.
PRETRAINED_STEMS = ("imagenet", "stride1", "upsample")

RESNET_OPTIONS = {
    "weights": Option(None, "a local state-dict file of pretrained weights", parse=_optional_path),
    "freeze_backbone": Option(False, "train only the new head (needs weights)", kind=bool),
    "stem": Option(
        "auto",
        "first layer: imagenet (7x7 stride 2 + max-pool), small (a new 3x3, stride 1), stride1"
        f" (the 7x7 at stride 1, no max-pool), upsample (images resized to {SMALL_IMAGE_BELOW}"
        f" px, then imagenet); auto: imagenet from {SMALL_IMAGE_BELOW} px, below it small, or"
        f" {PRETRAINED_SMALL_STEM} with weights",
        choices=RESNET_STEMS,
    ),
}


def resnet_stem(
    input_shape: tuple[int, int, int], weights: str | None, freeze_backbone: bool, stem: str
) -> str:
    """The stem a ResNet with these options gets (`auto` resolved). LoadbenchError for options
    that would leave a freshly initialised layer where pretrained or frozen ones are asked for."""
    if freeze_backbone and weights is None:
        raise LoadbenchError(
            "--freeze-backbone without --weights would freeze a randomly initialised backbone"
            " that never learns: give --weights FILE (a pretrained state dict), or do not freeze"
        )
    if stem == "auto":
        if min(input_shape[1:]) >= SMALL_IMAGE_BELOW:
            return "imagenet"
        return "small" if weights is None else PRETRAINED_SMALL_STEM
    if stem == "small" and weights is not None:
        raise LoadbenchError(
            f"--stem small starts with a new 3x3 conv1 and cannot use the 7x7 conv1 of weights"
            f" file {weights}: with weights use --stem {', '.join(PRETRAINED_STEMS)} or auto"
        )
    return stem


def _resnet(arch: str) -> Builder:
    def build(input_shape: tuple[int, int, int], classes: int, **options: Any):
        from loadbench.training.pretrained import build_resnet

        stem = resnet_stem(input_shape, **options)
        return build_resnet(
            arch, input_shape, classes, options["weights"], options["freeze_backbone"], stem,
            upsample_to=SMALL_IMAGE_BELOW,
        )  # fmt: skip

    return build


def _resnet_parameters(arch: str) -> Callable[..., int]:
    def count(input_shape: tuple[int, int, int], classes: int, **options: Any) -> int:
        kernel = 3 if resnet_stem(input_shape, **options) == "small" else 7
        return blocks.resnet_parameters(arch, input_shape, classes, kernel)

    return count


def _resnet_architecture(input_shape: tuple[int, int, int], options: dict[str, Any]):
    resolved = resolve_model_options("resnet18", options)  # every ResNet takes these options
    stem = resnet_stem(input_shape, resolved["weights"], False, resolved["stem"])
    return {**options, "stem": stem, "weights": None, "freeze_backbone": False}


for _arch, _layers in (("resnet18", 18), ("resnet50", 50)):
    register_model(
        _arch,
        summary=f"torchvision ResNet-{_layers}, new head; local pretrained weights, frozen "
        "backbone optional",
        options=RESNET_OPTIONS,
        any_size=True,
        parameters=_resnet_parameters(_arch),
        architecture=_resnet_architecture,
    )(_resnet(_arch))
