"""Self-describing model files and resumable run checkpoints, written atomically.

`model.pt` holds the weights and everything needed to use them (model name and options, input
shape, class names, normalisation), as plain tensors, lists and strings, so it loads with
`torch.load(weights_only=True)`: a model file cannot run code.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from loadbench.errors import LoadbenchError
from loadbench.util import atomic_file

MODEL_FORMAT = 1


class Normalize(torch.nn.Module):
    """(x - mean) / std per channel; stored in the model, so predictions need no extra step."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(torch.nn.Module):
    """Normalisation + network: takes float images in [0, 1], returns logits."""

    def __init__(self, net: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_classifier(meta: dict[str, Any]) -> Classifier:
    """The network a model file was saved from, to load its weights into. Files record the
    architecture's options; files of older versions recorded the weights file they started
    from, which is dropped (the file's own weights replace it)."""
    from loadbench.training.models import architecture_options, create_model

    shape = tuple(meta["input_shape"])
    options = {k: v for k, v in meta["model_options"].items() if k != "weights"}
    options = architecture_options(meta["model"], shape, options)
    net = create_model(meta["model"], shape, len(meta["classes"]), **options)
    return Classifier(net, meta["mean"], meta["std"])


def save_atomic(obj: Any, path: str) -> None:
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def save_model(path: str, model: Classifier, meta: dict[str, Any]) -> None:
    """Save weights with `meta`: model, model_options, input_shape (C,H,W), classes, mean, std."""
    state = {k: v.detach().cpu() for k, v in _plain(model).state_dict().items()}
    save_atomic({"loadbench_model": MODEL_FORMAT, **meta, "state_dict": state}, path)


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """The model of a `model.pt` (ready in eval mode) and its metadata."""
    blob = _load(path)
    if not isinstance(blob, dict) or "loadbench_model" not in blob:
        raise LoadbenchError(f"{path} is not a model saved by `loadbench train`")
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    model = build_classifier(meta)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise LoadbenchError(f"{path}: the weights do not fit {meta['model']}: {e}") from None
    return model.to(device).eval(), meta


def _load(path: str) -> Any:
    if not os.path.isfile(path):
        raise LoadbenchError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean: not our file
        raise LoadbenchError(f"{path} cannot be loaded as a model file: {e}") from None


def load_checkpoint(path: str) -> dict[str, Any]:
    blob = _load(path)
    if not isinstance(blob, dict) or "epoch" not in blob:
        raise LoadbenchError(f"{path} is not a loadbench training checkpoint")
    return blob


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile's wrapper, so state-dict keys stay stable."""
    return getattr(model, "_orig_mod", model)
