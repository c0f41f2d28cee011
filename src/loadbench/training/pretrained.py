"""torchvision ResNets with a new head, and pretrained weights from a local file (never a
download): transfer learning as document 002 does it.

With weights, every backbone tensor of the file goes into the model, or one error says what did
not fit; the file's head is replaced by the new one, and a note says so. Which stem a model gets
(`auto` resolved) and which option combinations are refused is decided, without torch, in
`models.resnet_stem`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from loadbench import progress
from loadbench.errors import LoadbenchError

ARCHITECTURES = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


class ShorterSideAtLeast(nn.Module):
    """Images resized (bilinear) so that their shorter side is at least `size` pixels, aspect
    ratio kept; larger images pass unchanged. No parameters: any H x W goes in."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        shorter = min(height, width)
        if shorter >= self.size:
            return x
        size = (round(height * self.size / shorter), round(width * self.size / shorter))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class UpsampledResNet(ResNet):
    """A ResNet that resizes small images up before its ImageNet stem (stem `upsample`), so
    pretrained filters see objects at the scale they learnt. The resize has no tensors: the
    state dict is a plain ResNet's, and loads into one and from one."""

    def __init__(self, *args, upsample_to: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.upsample = ShorterSideAtLeast(upsample_to)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.upsample(x))


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
    upsample_to: int = 96,
) -> nn.Module:
    """A torchvision ResNet for (C, H, W) inputs and `classes` outputs, with `stem` (resolved
    and checked by `models.resnet_stem`): imagenet, small, stride1 or upsample."""
    c = input_shape[0]
    block, layers = ARCHITECTURES[arch]
    # Built here, never downloaded: pretrained weights come from a local file.
    if stem == "upsample":
        model: ResNet = UpsampledResNet(block, layers, num_classes=classes, upsample_to=upsample_to)
    else:
        model = ResNet(block, layers, num_classes=classes)
    if stem == "small":  # the usual CIFAR adaptation: keep full resolution into layer1
        model.conv1 = _new_conv(nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
    elif stem == "stride1":  # torchvision's 7x7 conv1 (pretrained weights fit) at stride 1
        model.conv1 = _new_conv(nn.Conv2d(c, 64, 7, stride=1, padding=3, bias=False))
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = _new_conv(nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False))
    if weights is not None:
        load_backbone_weights(model, weights, f"{arch} (stem {stem})")
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
    from_loadbench = isinstance(loaded, Mapping) and "loadbench_model" in loaded
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if from_loadbench:  # a model.pt of `loadbench train`: the network, without its normalisation
        loaded = {k.removeprefix("net."): v for k, v in loaded.items() if k.startswith("net.")}
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
    grey = target.ndim == 4 and target.shape[1] == 1 and saved.shape[0] == target.shape[0]
    if key == "conv1.weight" and grey and saved.ndim == 4 and saved.shape[2:] == target.shape[2:]:
        return saved.sum(dim=1, keepdim=True)
    return None


def _listed(keys: list[str], among: Iterable[str], limit: int = 4) -> str:
    """`keys` in few words: a module all of whose tensors (of `among`) are listed is `layer4.*`
    (batch-norm counters aside)."""

    def module(key: str) -> str:
        return key.split(".")[0]

    def per_module(names: Iterable[str]) -> Counter[str]:
        return Counter(module(k) for k in names if not k.endswith(".num_batches_tracked"))

    total, listed = per_module(among), per_module(keys)
    whole = {name for name, count in listed.items() if count == total[name] > 1}
    parts = list(dict.fromkeys(f"{module(k)}.*" if module(k) in whole else k for k in keys))
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _misfit(path: str, what: str, model_keys: list[str], saved: Mapping[str, torch.Tensor],
            missing: list[str], shapes: list[str], extra: list[str]) -> LoadbenchError:  # fmt: skip
    """One line on what of the file did not fit the model."""

    def tensors(n: int) -> str:
        return f"{n} tensor{'s' if n > 1 else ''}"

    problems = []
    if missing:
        problems.append(f"the file lacks {tensors(len(missing))}: {_listed(missing, model_keys)}")
    if shapes:
        problems.append(f"{tensors(len(shapes))} of another shape: {'; '.join(shapes[:3])}")
    if extra:
        problems.append(f"{tensors(len(extra))} the model lacks: {_listed(extra, saved)}")
    return LoadbenchError(
        f"weights file {path} does not fit {what}: {'; '.join(problems)}. Is it a state dict of"
        f" the same architecture? (pretrained weights are used whole or not at all)"
    )


def load_backbone_weights(model: nn.Module, path: str, what: str = "this ResNet") -> None:
    """Load every backbone tensor of the state dict in `path` into a ResNet, or raise one
    LoadbenchError naming what did not fit: tensors the file lacks, tensors of another shape,
    tensors the model does not have. The file's head (`fc.*`) is replaced by the model's new
    one; a grey model takes the file's RGB conv1 summed over colours. A note says what loaded.
    """
    saved = _read_state_dict(path)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    loaded: dict[str, torch.Tensor] = {}
    missing, shapes = [], []
    for key, tensor in target.items():
        if key not in saved:
            # Batch-norm counters (unused with a momentum): files from before PyTorch 0.4.1
            # have none, and the model's count of 0 stays.
            if not key.endswith(".num_batches_tracked"):
                missing.append(key)
            continue
        value = _adapt_tensor(key, saved[key], tensor)
        if value is None:
            shapes.append(f"{key} (file {tuple(saved[key].shape)}, model {tuple(tensor.shape)})")
        else:
            loaded[key] = value
    extra = [k for k in saved if k not in target and not k.startswith("fc.")]
    if missing or shapes or extra:
        raise _misfit(path, what, list(target), saved, missing, shapes, extra)
    model.load_state_dict(loaded, strict=False)
    progress.note(_loaded_text(path, saved, loaded, model))


def _loaded_text(path: str, saved: Mapping[str, torch.Tensor],
                 loaded: Mapping[str, torch.Tensor], model: nn.Module) -> str:  # fmt: skip
    """`weights r18.pt: 120 tensors loaded into the backbone; its head (fc, 1000 classes)
    replaced by a new 10-class head`."""
    text = f"weights {path}: {len(loaded)} tensors loaded into the backbone"
    if loaded["conv1.weight"] is not saved["conv1.weight"]:
        text += f" (conv1 summed over its {saved['conv1.weight'].shape[1]} colours: grey images)"
    new_head = f"a new {model.fc.out_features}-class head"
    if "fc.weight" not in saved:
        return f"{text}; the file has no head (fc): {new_head}"
    return f"{text}; its head (fc, {saved['fc.weight'].shape[0]} classes) replaced by {new_head}"
