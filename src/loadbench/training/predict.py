"""`loadbench predict`: a trained model on image files of any size (document 004's last step)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loadbench.errors import LoadbenchError
from loadbench.formats.pixels import to_tensor
from loadbench.sources.images import read_image
from loadbench.training.checkpoint import load_model
from loadbench.training.models import accepts_any_size


@dataclass
class Prediction:
    path: str
    size: tuple[int, int]  # (height, width) the model saw
    top: list[tuple[str, float]]  # (class, probability), most likely first


def predict_files(
    model_path: str, images: list[str], top: int = 3, device: str = "cpu"
) -> list[Prediction]:
    """Class probabilities for each image file.

    A model that accepts any size (global-average-pooling head) sees each image at its own
    size, non-square included; any other model sees it resized and centre-cropped to the
    training size, as `folder:` sources are.
    """
    model, meta = load_model(model_path, device)
    channels, height, width = meta["input_shape"]
    any_size = accepts_any_size(meta["model"], meta["model_options"])
    classes = meta["classes"]
    results = []
    for path in images:
        size = _own_size(path) if any_size else (height, width)
        pixels = read_image(path, size, channels)  # LoadbenchError names a broken file
        batch = to_tensor(pixels[None]).to(device)
        with torch.no_grad():
            probabilities = torch.softmax(model(batch).float(), dim=1)[0].cpu().numpy()
        order = np.argsort(-probabilities)[: max(1, top)]
        results.append(
            Prediction(path, size, [(classes[i], float(probabilities[i])) for i in order])
        )
    return results


def _own_size(path: str) -> tuple[int, int]:
    from loadbench.sources.images import image_size

    height, width = image_size(path)
    if min(height, width) < 1:
        raise LoadbenchError(f"{path} has no pixels")
    return height, width
