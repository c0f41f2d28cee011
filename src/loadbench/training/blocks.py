"""The arithmetic of the built-in networks, without torch: per-layer dropout rates, the size left
after pooling, and parameter counts (what `loadbench models` shows, in a fraction of a second;
`tests/test_model_counts.py` checks every count against the built network's)."""

from __future__ import annotations

from loadbench.errors import LoadbenchError


def per_layer(dropout: float | tuple[float, ...], layers: int, what: str, unit: str) -> tuple[
    float, ...
]:  # fmt: skip
    """One dropout rate for every layer, or one per layer (any other count is an error)."""
    rates = (dropout,) * layers if isinstance(dropout, float) else tuple(dropout)
    if len(rates) != layers:
        raise LoadbenchError(
            f"model {what} but {len(rates)} dropout rates: give one rate, or one per {unit}"
        )
    return rates


def cnn_blocks_rates(widths: tuple[int, ...], dropout) -> tuple[float, ...]:
    what = f"cnn-blocks has {len(widths)} blocks (widths={','.join(map(str, widths))})"
    return per_layer(dropout, len(widths), what, "block")


def mlp_rates(hidden: tuple[int, ...], dropout) -> tuple[float, ...]:
    return per_layer(dropout, len(hidden), f"mlp has {len(hidden)} hidden layers", "hidden layer")


def pooled_size(height: int, width: int, pool: int, blocks: int) -> tuple[int, int]:
    """The spatial size after `blocks` max-pools of `pool` that pool only while both sides are
    at least `pool` (nets.MaxPoolIfLarger)."""
    for _ in range(blocks):
        if pool > 1 and height >= pool and width >= pool:
            height, width = height // pool, width // pool
    return height, width


def check_tiny(height: int, width: int) -> None:
    if height < 8 or width < 8:
        raise LoadbenchError(
            f"model cnn-tiny needs images of at least 8x8 (it max-pools by 8); got {height}x"
            f"{width}: use cnn-blocks or mlp for smaller images"
        )


def _conv(in_ch: int, out_ch: int, kernel: int, bias: bool) -> int:
    return in_ch * out_ch * kernel * kernel + (out_ch if bias else 0)


def _linear(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def cnn_tiny_parameters(shape: tuple[int, int, int], classes: int, filters: int) -> int:
    c, h, w = shape
    check_tiny(h, w)
    flat = filters * (h // 8) * (w // 8)
    return _conv(c, filters, 3, True) + _conv(filters, filters, 3, True) + _linear(flat, classes)


def cnn_blocks_parameters(shape: tuple[int, int, int], classes: int, widths: tuple[int, ...],
                          batch_norm: bool, dropout, pool: int, head: str,
                          **_: object) -> int:  # fmt: skip
    c, h, w = shape
    cnn_blocks_rates(widths, dropout)
    total = 0
    for in_ch, out_ch in zip((c, *widths[:-1]), widths, strict=True):
        for conv_in in (in_ch, out_ch):  # conv [+ BN: weight and bias]
            total += _conv(conv_in, out_ch, 3, not batch_norm) + (2 * out_ch if batch_norm else 0)
    if head == "gap":
        return total + _linear(widths[-1], classes)
    out_h, out_w = pooled_size(h, w, pool, len(widths))
    return total + _linear(widths[-1] * out_h * out_w, classes)


def mlp_parameters(shape: tuple[int, int, int], classes: int, hidden: tuple[int, ...],
                   dropout) -> int:  # fmt: skip
    c, h, w = shape
    mlp_rates(hidden, dropout)
    total, width = 0, c * h * w
    for size in hidden:
        total, width = total + _linear(width, size), size
    return total + _linear(width, classes)


# torchvision ResNets with the ImageNet stem on 3-channel images, without conv1 and fc: the
# parameters that do not depend on the input's channels or the classes.
RESNET_BODY = {"resnet18": 11_176_512 - 64 * 3 * 7 * 7, "resnet50": 23_508_032 - 64 * 3 * 7 * 7}
RESNET_FEATURES = {"resnet18": 512, "resnet50": 2048}


def resnet_parameters(arch: str, shape: tuple[int, int, int], classes: int, kernel: int) -> int:
    """A torchvision ResNet's parameters with a conv1 of `kernel` x `kernel` over the input's
    channels and a head of `classes`."""
    return (
        RESNET_BODY[arch]
        + _conv(shape[0], 64, kernel, False)
        + _linear(RESNET_FEATURES[arch], classes)
    )
