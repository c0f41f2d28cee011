"""The built-in networks (cnn-tiny, cnn-blocks, mlp) and the layers they are made of (document
004's conv-conv-pool blocks). Registered, with their options, in `models.py`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loadbench.errors import LoadbenchError

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "selu": nn.SELU}


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


def pooled_size(height: int, width: int, pool: int, blocks: int) -> tuple[int, int]:
    """The spatial size after `blocks` MaxPoolIfLarger(pool) layers."""
    for _ in range(blocks):
        if pool > 1 and height >= pool and width >= pool:
            height, width = height // pool, width // pool
    return height, width


# --- networks ---------------------------------------------------------------------------------


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
        out_h, out_w = pooled_size(h, w, pool, len(widths))
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
