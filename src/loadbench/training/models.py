"""Image classifiers by name: a registry of small builders and one factory, `create_model`.

Every model takes (C, H, W) inputs and returns LOGITS (softmax is applied at prediction time, and
the loss takes logits). Options may arrive as strings from the CLI or YAML ("20,40,80", "true");
`resolve_model_options` turns them into typed values in one place, so builders get clean input.
torchvision is imported inside the ResNet builders only, so listing models stays light.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from loadbench.errors import LoadbenchError

Builder = Callable[..., nn.Module]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "selu": nn.SELU}


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, one line for `loadbench models`, and its option defaults."""

    name: str
    summary: str
    options: dict[str, Any]
    builder: Builder = field(repr=False, compare=False)
    # True, or a function of the resolved options, when the model takes inputs of any H x W.
    any_size: bool | Callable[[dict[str, Any]], bool] = field(default=False, repr=False)


_MODELS: dict[str, ModelSpec] = {}


# --- option values: parsed and checked here, once, for every model ----------------------------


def _as_int(value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a whole number")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None
    if number < minimum:
        raise ValueError(f"must be at least {minimum}")
    return number


def _as_list(value: Any) -> list[Any]:
    # "20,40,80", "[20, 40]", (20, 40) and a lone 20 all mean a list of values.
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _positive_ints(value: Any, allow_empty: bool = False) -> tuple[int, ...]:
    numbers = tuple(_as_int(v) for v in _as_list(value))
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
    rates = tuple(_rate(v) for v in _as_list(value))
    if not rates:
        raise ValueError("needs a rate in [0, 1), or one rate per layer")
    return rates[0] if len(rates) == 1 else rates


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("must be true or false")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {'|'.join(choices)}")
        return text

    return parse


def _optional_path(value: Any) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return os.fspath(value)


# Option names mean the same thing in every model, so one table parses them all.
OPTION_PARSERS: dict[str, Callable[[Any], Any]] = {
    "filters": _as_int,
    "widths": _positive_ints,
    "hidden": lambda v: _positive_ints(v, allow_empty=True),
    "activation": _choice(*ACTIVATIONS),
    "batch_norm": _flag,
    "dropout": _rates,
    "pool": _as_int,
    "head": _choice("gap", "flatten"),
    "weights": _optional_path,
    "freeze_backbone": _flag,
    "stem": _choice("auto", "imagenet", "small"),
}


# --- the registry --------------------------------------------------------------------------------


def register_model(
    name: str,
    summary: str,
    options: dict[str, Any] | None = None,
    any_size: bool | Callable[[dict[str, Any]], bool] = False,
) -> Callable[[Builder], Builder]:
    """Register `builder(input_shape, classes, **options) -> nn.Module` under `name`."""
    defaults = dict(options or {})
    unparsed = [key for key in defaults if key not in OPTION_PARSERS]
    if unparsed:  # a programming error, caught when the module is imported
        raise TypeError(f"model {name!r}: add a parser to OPTION_PARSERS for {unparsed}")

    def decorate(builder: Builder) -> Builder:
        _MODELS[name] = ModelSpec(name, summary, defaults, builder, any_size)
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


def model_defaults(name: str) -> dict[str, Any]:
    """The default options of model `name` (a copy: change it freely)."""
    return dict(_spec(name).options)


def resolve_model_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of model `name` updated with `options`, every value parsed and checked.

    Option names may use dashes as on the command line (`batch-norm` = `batch_norm`).
    """
    spec = _spec(name)
    resolved = dict(spec.options)
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
            resolved[key] = OPTION_PARSERS[key](value)
        except ValueError as e:
            raise LoadbenchError(f"model {name!r} option {key}={value!r}: {e}") from None
    return resolved


def _check_shape(input_shape: Any, classes: Any) -> tuple[tuple[int, int, int], int]:
    try:
        shape = tuple(_as_int(n) for n in input_shape)
        classes = _as_int(classes)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3:
        raise LoadbenchError(
            f"a model needs an input shape (channels, height, width) of positive numbers and at"
            f" least 1 class; got input_shape={input_shape!r}, classes={classes!r}"
        )
    return shape, classes


def create_model(
    name: str, input_shape: tuple[int, int, int], classes: int, **options: Any
) -> nn.Module:
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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) number of parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def options_text(options: Mapping[str, Any]) -> str:
    """Options as `key=value` pairs in the form the CLI accepts back (`widths=20,40`)."""

    def show(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if value is None:
            return "none"
        if isinstance(value, tuple | list):
            return ",".join(str(v) for v in value)
        return str(value)

    return " ".join(f"{key}={show(value)}" for key, value in options.items())


def models_table(
    input_shape: tuple[int, int, int], classes: int
) -> list[tuple[str, str, int, str]]:
    """(name, summary, parameters with default options, option defaults) for every model.

    The parameter count is 0 for a model that cannot take `input_shape` (cnn-tiny below 8x8).
    """
    rows = []
    for spec in list_models():
        # On the meta device parameters have shapes but no memory: an mlp on 512x512 images
        # would otherwise allocate gigabytes just to be counted.
        try:
            with torch.device("meta"):
                total = count_parameters(create_model(spec.name, input_shape, classes))[0]
        except LoadbenchError:
            total = 0
        rows.append((spec.name, spec.summary, total, options_text(spec.options)))
    return rows


# --- building blocks -----------------------------------------------------------------------------


class MaxPoolIfLarger(nn.Module):
    """Max-pool by `size`, but only when both spatial dims are at least `size`.

    Decided per call from the input, so a deep stack of blocks never shrinks a small image
    (8x8 digits through 4 blocks) below 1x1: the late blocks just skip their pooling.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1 and x.shape[-2] >= self.size and x.shape[-1] >= self.size:
            return F.max_pool2d(x, self.size)
        return x

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ExpectInput(nn.Module):
    """Checks that inputs have the (C, H, W) a model was built for, with an error for a person.

    Models with a flattening head have a fixed first Linear layer; without this check another
    image size fails deep inside torch with a matrix-shape message.
    """

    def __init__(self, model: str, shape: tuple[int, int, int], hint: str):
        super().__init__()
        self.model, self.shape, self.hint = model, tuple(shape), hint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.shape:
            c, h, w = self.shape
            got = "x".join(str(n) for n in x.shape[-3:])
            raise LoadbenchError(
                f"model {self.model} was built for {c}x{h}x{w} (CxHxW) inputs but got {got};"
                f" {self.hint}"
            )
        return x

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def conv_block(
    in_ch: int, out_ch: int, activation: str, batch_norm: bool, dropout: float, pool: int
) -> nn.Sequential:
    """conv3x3 [+BN] + act, conv3x3 [+BN] + act, max-pool, [dropout]: one block of doc 004."""
    layers: list[nn.Module] = []
    for channels_in in (in_ch, out_ch):
        # A conv bias right before BatchNorm is cancelled by BN's mean subtraction.
        layers.append(nn.Conv2d(channels_in, out_ch, 3, padding="same", bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(ACTIVATIONS[activation]())
    layers.append(MaxPoolIfLarger(pool))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _pooled_size(height: int, width: int, pool: int, blocks: int) -> tuple[int, int]:
    """The spatial size after `blocks` MaxPoolIfLarger(pool) layers."""
    for _ in range(blocks):
        if pool > 1 and height >= pool and width >= pool:
            height, width = height // pool, width // pool
    return height, width


# --- models --------------------------------------------------------------------------------------


@register_model(
    "cnn-tiny",
    summary="doc 004's minimal net: 2 sigmoid convs, 8x8 max-pool, linear; inputs in [0, 1]",
    options={"filters": 5},
)
def cnn_tiny(input_shape: tuple[int, int, int], classes: int, filters: int) -> nn.Module:
    c, h, w = input_shape
    if h < 8 or w < 8:
        raise LoadbenchError(
            f"model cnn-tiny needs images of at least 8x8 (it max-pools by 8); got {h}x{w}:"
            f" use cnn-blocks or mlp for smaller images"
        )
    return nn.Sequential(
        ExpectInput("cnn-tiny", input_shape, "resize the images or use cnn-blocks --head gap"),
        nn.Conv2d(c, filters, 3, padding="same"),
        nn.Sigmoid(),
        nn.Conv2d(filters, filters, 3, padding="same"),
        nn.Sigmoid(),
        nn.MaxPool2d(8),
        nn.Flatten(),
        nn.Linear(filters * (h // 8) * (w // 8), classes),
    )


@register_model(
    "cnn-blocks",
    summary="conv-conv-pool blocks (doc 004), optional batch norm and dropout, GAP or flatten head",
    options={
        "widths": (20, 40, 80, 160),
        "activation": "relu",
        "batch_norm": False,
        "dropout": 0.0,
        "pool": 2,
        "head": "gap",
    },
    any_size=lambda options: options["head"] == "gap",
)
def cnn_blocks(
    input_shape: tuple[int, int, int],
    classes: int,
    widths: tuple[int, ...],
    activation: str,
    batch_norm: bool,
    dropout: float | tuple[float, ...],
    pool: int,
    head: str,
) -> nn.Module:
    rates = _per_layer(
        dropout, len(widths), f"cnn-blocks has {len(widths)} blocks (widths="
        f"{','.join(map(str, widths))})", "block",
    )  # fmt: skip
    c, h, w = input_shape
    layers: list[nn.Module] = []
    if head == "flatten":
        layers.append(ExpectInput("cnn-blocks", input_shape, "use --head gap for any image size"))
    for in_ch, out_ch, rate in zip((c, *widths[:-1]), widths, rates, strict=True):
        layers.append(conv_block(in_ch, out_ch, activation, batch_norm, rate, pool))
    if head == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes)]
    else:
        out_h, out_w = _pooled_size(h, w, pool, len(widths))
        layers += [nn.Flatten(), nn.Linear(widths[-1] * out_h * out_w, classes)]
    return nn.Sequential(*layers)


def _per_layer(
    dropout: float | tuple[float, ...], layers: int, what: str, unit: str
) -> tuple[float, ...]:
    """One dropout rate for every layer, or one per layer (any other count is an error)."""
    rates = (dropout,) * layers if isinstance(dropout, float) else tuple(dropout)
    if len(rates) != layers:
        raise LoadbenchError(
            f"model {what} but {len(rates)} dropout rates: give one rate, or one per {unit}"
        )
    return rates


@register_model(
    "mlp",
    summary="flattened pixels through ReLU hidden layers: the no-convolution baseline",
    options={"hidden": (512, 256), "dropout": 0.0},
)
def mlp(
    input_shape: tuple[int, int, int],
    classes: int,
    hidden: tuple[int, ...],
    dropout: float | tuple[float, ...],
) -> nn.Module:
    rates = _per_layer(dropout, len(hidden), f"mlp has {len(hidden)} hidden layers", "hidden layer")
    c, h, w = input_shape
    layers: list[nn.Module] = [
        ExpectInput("mlp", input_shape, "resize the images or use cnn-blocks --head gap"),
        nn.Flatten(),
    ]
    width = c * h * w
    for size, rate in zip(hidden, rates, strict=True):
        layers += [nn.Linear(width, size), nn.ReLU()]
        if rate > 0:
            layers.append(nn.Dropout(rate))
        width = size
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


# --- ResNets from torchvision --------------------------------------------------------------------

RESNET_OPTIONS = {"weights": None, "freeze_backbone": False, "stem": "auto"}
# Below this size the ImageNet stem (7x7 stride 2 + max-pool) throws away most of the image.
SMALL_STEM_BELOW = 96


def _new_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # torchvision initialises its convs this way; a replaced conv1 should start like the rest.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _build_resnet(
    arch: str,
    input_shape: tuple[int, int, int],
    classes: int,
    weights: str | None,
    freeze_backbone: bool,
    stem: str,
) -> nn.Module:
    import torchvision  # heavy: only when a ResNet is built

    c, h, w = input_shape
    # weights=None always: loadbench never downloads; pretrained weights come from a local file.
    model = getattr(torchvision.models, arch)(weights=None, num_classes=classes)
    if stem == "auto":
        stem = "small" if min(h, w) < SMALL_STEM_BELOW else "imagenet"
    if stem == "small":  # the usual CIFAR adaptation: keep full resolution into layer1
        model.conv1 = _new_conv(nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = _new_conv(nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False))
    if weights is not None:
        load_backbone_weights(model, weights)
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("fc.")
    return model


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise LoadbenchError(f"weights file {path} does not exist: give a saved state dict (.pt)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise LoadbenchError(
            f"weights file {path} could not be read as a PyTorch state dict: {e}".splitlines()[0]
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise LoadbenchError(
            f"weights file {path} holds no state dict (a mapping of names to tensors):"
            f" save one with torch.save(model.state_dict(), path)"
        )
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if loaded and all(str(k).startswith("module.") for k in loaded):
        loaded = {str(k).removeprefix("module."): v for k, v in loaded.items()}
    return dict(loaded)


def _adapt_tensor(key: str, saved: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """`saved` in the shape of `target`, or None when it cannot be used."""
    if saved.shape == target.shape:
        return saved
    # A grey-scale model from RGB weights: the sum over colours responds to a grey image as
    # the RGB filter responds to the same image in colour.
    grey = target.shape[1] == 1 and saved.shape[0] == target.shape[0]
    if key == "conv1.weight" and grey and saved.shape[2:] == target.shape[2:]:
        return saved.sum(dim=1, keepdim=True)
    return None


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load every matching backbone tensor of the state dict in `path` into a ResNet.

    The new head `fc` keeps its fresh weights; conv1 is skipped when its kernel differs (the
    small stem). Fewer than half the backbone tensors matching is an error.
    """
    saved = _read_state_dict(path)
    target = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in target.items():
        if key.startswith("fc."):
            continue
        if key == "conv1.weight" and key in saved and saved[key].shape[2:] != tensor.shape[2:]:
            continue  # small stem: a 3x3 conv cannot reuse 7x7 weights, and is expected to differ
        value = _adapt_tensor(key, saved[key], tensor) if key in saved else None
        if value is None:
            shape = tuple(saved[key].shape) if key in saved else "missing"
            mismatched.append(f"{key} (file: {shape}, model: {tuple(tensor.shape)})")
        else:
            loaded[key] = value
    if len(loaded) < len(mismatched):  # fewer than half of the backbone's tensors
        raise LoadbenchError(
            f"weights file {path} does not fit this model: only {len(loaded)} of"
            f" {len(loaded) + len(mismatched)} backbone tensors match; first mismatches:"
            f" {'; '.join(mismatched[:3])}. Is it a state dict of the same architecture?"
        )
    if mismatched:
        warnings.warn(
            f"weights file {path}: {len(mismatched)} backbone tensors did not match and keep"
            f" their random values, e.g. {mismatched[0]}",
            stacklevel=2,
        )
    model.load_state_dict(loaded, strict=False)


@register_model(
    "resnet18",
    summary="torchvision ResNet-18, new head; local pretrained weights, frozen backbone optional",
    options=RESNET_OPTIONS,
    any_size=True,
)
def resnet18(input_shape: tuple[int, int, int], classes: int, **options: Any) -> nn.Module:
    return _build_resnet("resnet18", input_shape, classes, **options)


@register_model(
    "resnet50",
    summary="torchvision ResNet-50, new head; local pretrained weights, frozen backbone optional",
    options=RESNET_OPTIONS,
    any_size=True,
)
def resnet50(input_shape: tuple[int, int, int], classes: int, **options: Any) -> nn.Module:
    return _build_resnet("resnet50", input_shape, classes, **options)
