"""torchvision ResNets with a new head, and pretrained weights from a local file (never a
download): transfer learning as document 002 does it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from loadbench.errors import LoadbenchError

# Below this size the ImageNet stem (7x7 stride 2 + max-pool) throws away most of the image.
SMALL_STEM_BELOW = 96


def _new_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # torchvision initialises its convs this way; a replaced conv1 should start like the rest.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_resnet(
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
