"""The built-in networks (cnn-tiny, cnn-blocks, mlp) and the layers they are made of (document
004's conv-conv-pool blocks). Registered, with their options, in `models.py`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loadbench.errors import LoadbenchError
from loadbench.training.blocks import check_tiny, pooled_size

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


# --- networks ---------------------------------------------------------------------------------


def cnn_tiny(input_shape: tuple[int, int, int], classes: int, filters: int) -> nn.Module:
    c, h, w = input_shape
    check_tiny(h, w)
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
    rates: tuple[float, ...],
    pool: int,
    head: str,
) -> nn.Module:
    """Document 004's network: one conv-conv-pool block per width (`rates`: dropout after each
    block), then a global-average-pooling or flattening head."""
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


def mlp(
    input_shape: tuple[int, int, int],
    classes: int,
    hidden: tuple[int, ...],
    rates: tuple[float, ...],
) -> nn.Module:
    """Flattened pixels through ReLU hidden layers (`rates`: dropout after each)."""
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
