"""`loadbench models` counts parameters without building a network (training/blocks.py): every
count equals the built model's, for every registered model and the options that change it."""

from __future__ import annotations

import pytest
import torch

from loadbench.errors import LoadbenchError
from loadbench.training.models import count_parameters, create_model, list_models, parameters

SHAPES = [(3, 32, 32), (1, 28, 28), (3, 64, 48), (1, 8, 8)]
OPTIONS = {
    "cnn-tiny": [{}, {"filters": 20}],
    "cnn-blocks": [{}, {"widths": "8,16", "batch_norm": True}, {"head": "flatten", "pool": 3},
                   {"widths": "4", "head": "flatten", "batch_norm": True}],
    "mlp": [{}, {"hidden": "64"}, {"hidden": ""}],
    "resnet18": [{}, {"stem": "imagenet"}, {"stem": "small"}, {"stem": "stride1"},
                 {"stem": "upsample"}],
    "resnet50": [{}, {"stem": "small"}, {"stem": "imagenet"}],
}  # fmt: skip


def test_every_model_has_options_to_check():
    assert set(OPTIONS) == {spec.name for spec in list_models()}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_counts_equal_the_built_models(name):
    for options in OPTIONS[name]:
        for shape in SHAPES:
            for classes in (3, 10):
                try:
                    counted = parameters(name, shape, classes, **options)
                except LoadbenchError:  # e.g. cnn-tiny below 8x8: building fails alike
                    with pytest.raises(LoadbenchError), torch.device("meta"):
                        create_model(name, shape, classes, **options)
                    continue
                with torch.device("meta"):  # shapes without memory
                    built = count_parameters(create_model(name, shape, classes, **options))[0]
                assert counted == built, (name, options, shape, classes)
