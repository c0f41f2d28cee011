"""Everything a training run is told, in one validated place (CLI flags and YAML keys alike).

Keys are the CLI's long option names with underscores: `--batch-size 64` on the command line is
`batch_size: 64` in a `--config` YAML file. Command-line values win over the file's. An unknown
key or a bad value is one error that names it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loadbench.errors import LoadbenchError
from loadbench.formats.chunked import DEFAULT_CHUNK_CACHE_BYTES

MODEL_OPTION_KEYS = (
    "filters", "widths", "activation", "batch_norm", "dropout", "pool", "head", "hidden",
    "weights", "freeze_backbone", "stem",
)  # fmt: skip
AUGMENTATIONS = ("flip", "crop", "rotate", "jitter")
# The epoch-order keys and their defaults: training's, experiments', and those of benchmark runs
# recorded before the keys existed.
ORDER_DEFAULTS = {
    "shuffle": "exact",
    "shuffle_window": 8,
    "chunk_cache_mb": DEFAULT_CHUNK_CACHE_BYTES >> 20,
}


class TrainConfig(BaseModel):
    """A training run. Defaults are the ones a first run should use."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field(description="a store made by `loadbench convert`, or a source spec")
    model: str = "cnn-blocks"
    # Model options (None = the model's default; an option the model does not take is an error).
    filters: int | None = None
    widths: str | list[int] | None = None
    activation: str | None = None
    batch_norm: bool | None = None
    dropout: str | float | list[float] | None = None
    pool: int | None = None
    head: str | None = None
    hidden: str | list[int] | None = None
    weights: str | None = None
    freeze_backbone: bool | None = None
    stem: str | None = None

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["sgd", "rmsprop", "adam", "adamw"] = "adam"
    lr: float | None = Field(None, gt=0, description="default: sgd 0.01, others 0.001")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)

    schedule: Literal["none", "step", "multistep", "cyclic", "cosine-restarts", "onecycle"] = "none"
    step_size: int | None = Field(None, gt=0, description="step: epochs per decay")
    gamma: float = Field(0.1, gt=0, le=1, description="step/multistep: decay factor")
    milestones: str | list[int] | None = None
    max_lr: float | None = Field(None, gt=0, description="cyclic/onecycle: the peak lr")
    cycle_epochs: float = Field(4.0, gt=0, description="cyclic: epochs per full cycle")
    restart_epochs: float | None = Field(None, gt=0, description="cosine-restarts: first period")
    restart_mult: int = Field(1, ge=1, description="cosine-restarts: period growth")

    augment: str | list[str] = Field(default_factory=list)
    normalize: bool | None = Field(None, description="per-channel mean/std of train; default on")
    balance: Literal["none", "weighted", "oversample"] = "none"
    early_stopping: int | None = Field(None, gt=0, description="patience in epochs")
    val_ratio: float | None = Field(None, gt=0, lt=1, description="carve val from train")
    eval_split: str | None = None
    kfold: int | None = Field(None, ge=2)

    access: Literal["sample", "batch", "device"] = "sample"
    workers: int = Field(0, ge=0)
    shuffle: Literal["exact", "block"] = Field(
        ORDER_DEFAULTS["shuffle"],
        description="block: chunk-aware order (faster on chunked stores, less random)",
    )
    shuffle_window: int = Field(
        ORDER_DEFAULTS["shuffle_window"], ge=1, description="block shuffle: chunks mixed together"
    )
    chunk_cache_mb: int = Field(
        ORDER_DEFAULTS["chunk_cache_mb"], ge=0, description="decoded-chunk cache per process"
    )
    cache_dir: str | None = Field(
        None, description="a store on object storage is read through a local copy kept here"
    )
    pin_memory: bool | None = None
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    seed: int = 0
    smooth: float = Field(0.0, ge=0, lt=1, description="EMA smoothing of the curves plot")
    overfit_batch: bool = False
    out: str | None = None

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        for name in value or []:
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS}")
        return value

    @field_validator("milestones", mode="before")
    @classmethod
    def _int_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError("must be comma-separated epochs, e.g. 50,75") from None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    def model_options(self) -> dict[str, Any]:
        """The model options that were given (the rest take the model's defaults)."""
        return {k: getattr(self, k) for k in MODEL_OPTION_KEYS if getattr(self, k) is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def explain(error: ValidationError, where: str = "training option") -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            known = ", ".join(TrainConfig.model_fields)
            problems.append(f"unknown {where} {key!r} (known: {known})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where} {key!r}: {message} (got {item.get('input')!r})")
    return "; ".join(problems)


def load_config(path: str | None = None, **overrides: Any) -> TrainConfig:
    """A config from an optional YAML file, with `overrides` (those not None) on top."""
    values: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise LoadbenchError(f"config file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise LoadbenchError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise LoadbenchError(f"config file {path} must be a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "data" not in values:
        raise LoadbenchError("no data to train on: give a store or source, or `data:` in --config")
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        where = f"key in {path}" if path else "training option"
        raise LoadbenchError(explain(e, where)) from None
