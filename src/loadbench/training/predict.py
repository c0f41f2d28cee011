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


RESIZE = ("auto", "train", "none")


def predict_files(
    model_path: str, images: list[str], top: int = 3, device: str = "cpu", resize: str = "auto"
) -> list[Prediction]:
    """Class probabilities for each image file, at the size `resize` says (`size_for`)."""
    model, meta = load_model(model_path, device)
    channels = meta["input_shape"][0]
    any_size = accepts_any_size(meta["model"], meta["model_options"])
    classes = meta["classes"]
    results = []
    for path in images:
        size = size_for(_own_size(path), tuple(meta["input_shape"][1:]), any_size, resize)
        pixels = read_image(path, size, channels)  # LoadbenchError names a broken file
        batch = to_tensor(pixels[None]).to(device)
        with torch.no_grad():
            probabilities = torch.softmax(model(batch).float(), dim=1)[0].cpu().numpy()
        order = np.argsort(-probabilities)[: max(1, top)]
        results.append(
            Prediction(path, size, [(classes[i], float(probabilities[i])) for i in order])
        )
    return results


def size_for(own: tuple[int, int], trained: tuple[int, int], any_size: bool,
             resize: str) -> tuple[int, int]:  # fmt: skip
    """The (height, width) an image of size `own` is shown to a model trained at `trained`.

    - `train`: resized (shorter side) and centre-cropped to the training size, as `folder:`
      sources are;
    - `none`: its own size (models with a global-average-pooling head only), e.g. document
      004's non-square 28x32 image;
    - `auto`: for a model that takes any size, scaled to the training scale: the shorter side
      becomes the training size's, the aspect ratio is kept (a 112x112 photo for a 28x28 model
      is seen at 28x28, a 28x32 scan for a 32x32 model at 32x37); for other models, `train`.
    """
    if resize not in RESIZE:
        raise LoadbenchError(f"--resize {resize!r}: choose {', '.join(RESIZE)}")
    if resize == "train" or (resize == "auto" and not any_size):
        return trained
    if resize == "none":
        if not any_size:
            raise LoadbenchError(
                f"this model takes {trained[0]}x{trained[1]} images only (it has no global "
                "average pooling head): use --resize train or auto"
            )
        return own
    scale = min(trained) / min(own)
    return max(1, round(own[0] * scale)), max(1, round(own[1] * scale))


def _own_size(path: str) -> tuple[int, int]:
    from loadbench.sources.images import image_size

    height, width = image_size(path)
    if min(height, width) < 1:
        raise LoadbenchError(f"{path} has no pixels")
    return height, width
