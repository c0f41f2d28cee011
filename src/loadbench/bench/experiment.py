"""An experiment file: the matrix of datasets x formats x dtypes x access x workers x cache x
repeats, and the training every run does. Validated with pydantic; expanded into runs.

    name: my-study
    datasets:
      - source: cifar10:~/data/cifar-10-python.tar.gz
        limit: 10000
    formats: [npy, hdf5, zarr, files-jpeg]      # or: all, peers
    dtypes: [uint8, float16]
    access: [sample, batch]
    workers: [0, 2]
    shuffle: [exact]                             # and/or block (chunk-aware, opt-in)
    epochs: 3
    repeats: 10
    cache: warm                                  # warm | cold | both
    mode: train                                  # train | loader-only
    train: {model: cnn-blocks, batch_norm: true} # the keys of `loadbench train`
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loadbench.errors import LoadbenchError
from loadbench.formats import DTYPES, expand_names, get_format
from loadbench.training.config import ORDER_DEFAULTS, TrainConfig, explain

# Matrix keys a run sets itself; they may not appear under `train:`.
MATRIX_KEYS = {"data", "out", "access", "workers", "batch_size", "pin_memory", "epochs", "seed",
               "kfold", "resume", "overfit_batch", "shuffle", "shuffle_window",
               "chunk_cache_mb"}  # fmt: skip
SCHEMA = 1


class Dataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="a source spec, as for `loadbench convert`")
    name: str | None = Field(None, description="label in results (default: from the spec)")
    limit: int | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, description="more source options")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        kind, _, rest = self.source.partition("?")[0].partition(":")
        if not rest:
            return kind  # digits, or synthetic with its default preset
        if kind == "synthetic":
            return rest  # the preset
        return f"{kind}:{os.path.basename(rest.rstrip('/'))}"


class Experiment(BaseModel):
    """The whole matrix. Defaults follow the study: 10 repeats, warm cache, real training."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    datasets: list[Dataset] = Field(min_length=1)
    formats: list[str] = Field(default_factory=lambda: ["all"])
    dtypes: list[Literal["uint8", "float16", "float32"]] = Field(default_factory=lambda: ["uint8"])
    format_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    access: list[Literal["sample", "batch", "device"]] = Field(default_factory=lambda: ["sample"])
    workers: list[int] = Field(default_factory=lambda: [0])
    shuffle: list[Literal["exact", "block"]] = Field(
        default_factory=lambda: [ORDER_DEFAULTS["shuffle"]],
        description="epoch orders: exact (default) and/or block (chunk-aware, opt-in)",
    )
    shuffle_window: int = Field(
        ORDER_DEFAULTS["shuffle_window"], ge=1, description="block shuffle: chunks mixed together"
    )
    chunk_cache_mb: int = Field(
        ORDER_DEFAULTS["chunk_cache_mb"], ge=0, description="decoded-chunk cache per process"
    )
    batch_size: int = Field(64, gt=0)
    pin_memory: bool | None = None
    epochs: int = Field(3, gt=0)
    repeats: int = Field(10, gt=0)
    seed: int = 0
    cache: Literal["warm", "cold", "both"] = "warm"
    mode: Literal["train", "loader-only"] = "train"
    device: str = "auto"
    train: dict[str, Any] = Field(default_factory=dict, description="keys of `loadbench train`")
    timeout_s: float = Field(1800, gt=0, description="a run taking longer is stopped and failed")
    sample_period_s: float = Field(0.2, gt=0, description="telemetry sampling period")
    fresh_interpreter: bool = Field(
        False, description="a new Python per run, instead of a fork of a clean template"
    )

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        try:
            return expand_names(value)
        except LoadbenchError as e:
            raise ValueError(str(e)) from None

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 0:
            raise ValueError("needs one or more worker counts >= 0")
        return value

    @field_validator("train")
    @classmethod
    def _train(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(value) & MATRIX_KEYS)
        if clash:
            raise ValueError(f"{', '.join(clash)} are set by the matrix, not under train:")
        try:
            TrainConfig.model_validate({"data": "-", **value})
        except ValidationError as e:
            raise ValueError(explain(e, "train option")) from None
        return value

    def cache_states(self) -> list[str]:
        return ["warm", "cold"] if self.cache == "both" else [self.cache]


def load_experiment(path: str | None) -> Experiment:
    """An experiment from a YAML file, or the built-in default one when `path` is None."""
    if path is None:
        path = os.path.join(os.path.dirname(__file__), "default.yaml")
    if not os.path.isfile(path):
        raise LoadbenchError(f"experiment file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise LoadbenchError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LoadbenchError(f"{path} must be a mapping (name:, datasets:, formats:, ...)")
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown key {where!r}")
            else:
                problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        raise LoadbenchError(f"{path}: " + "; ".join(problems)) from None


@dataclass
class Cell:
    """One combination of the matrix (all repeats of it share the store and the settings)."""

    dataset: Dataset
    format: str
    dtype: str
    access: str
    workers: int
    cache: str
    shuffle: str = "exact"
    skip: str | None = None  # why this combination is not run

    @property
    def label(self) -> str:
        order = "" if self.shuffle == "exact" else f" {self.shuffle}-shuffle"
        return (
            f"{self.dataset.label} {self.format}/{self.dtype} {self.access} w{self.workers}"
            f"{order} {self.cache}"
        )


@dataclass
class RunSpec:
    """Everything one run needs; written to a file for the run's own process."""

    key: str
    repeat: int
    seed: int
    cell: Cell
    experiment: Experiment
    store_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The resolved configuration of the run (what the key hashes, minus the repeat)."""
        e, c = self.experiment, self.cell
        # Keys added after the first schema appear only when not at their default, so that
        # the runs of older results directories keep their keys.
        later = {"shuffle": c.shuffle, "shuffle_window": e.shuffle_window,
                 "chunk_cache_mb": e.chunk_cache_mb}  # fmt: skip
        return {
            **{k: v for k, v in later.items() if v != ORDER_DEFAULTS[k]},
            "schema": SCHEMA,
            "dataset": c.dataset.model_dump(),
            "format": c.format,
            "dtype": c.dtype,
            "format_options": e.format_options.get(c.format, {}),
            "access": c.access,
            "workers": c.workers,
            "cache": c.cache,
            "batch_size": e.batch_size,
            "pin_memory": e.pin_memory,
            "epochs": e.epochs,
            "mode": e.mode,
            "device": e.device,
            "train": e.train,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "repeat": self.repeat,
            "seed": self.seed,
            "store_path": self.store_path,
            "settings": self.settings(),
            "experiment": self.experiment.model_dump(),
            "cell": {
                "dataset": self.cell.dataset.model_dump(),
                "label": self.cell.dataset.label,
                "format": self.cell.format,
                "dtype": self.cell.dtype,
                "access": self.cell.access,
                "workers": self.cell.workers,
                "cache": self.cell.cache,
                "shuffle": self.cell.shuffle,
            },
        }


def run_key(settings: dict[str, Any], repeat: int) -> str:
    text = json.dumps({"settings": settings, "repeat": repeat}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand(experiment: Experiment) -> list[Cell]:
    """Every cell of the matrix, with invalid combinations marked (not dropped): a user sees
    what was not run and why."""
    cells = []
    for dataset in experiment.datasets:
        for fmt in experiment.formats:
            for dtype in experiment.dtypes:
                for access in experiment.access:
                    for workers in experiment.workers:
                        for shuffle in experiment.shuffle:
                            for cache in experiment.cache_states():
                                cell = Cell(dataset, fmt, dtype, access, workers, cache, shuffle)
                                cell.skip = _why_not(cell)
                                cells.append(cell)
    return cells


def _why_not(cell: Cell) -> str | None:
    fmt = get_format(cell.format)
    if missing := fmt.missing():
        return missing
    if cell.access not in fmt.accesses:
        return f"{cell.format} runs its own pipeline with {'/'.join(fmt.accesses)} access only"
    if cell.shuffle != "exact" and fmt.own_order:
        return (
            f"{cell.format} streams in its library's own order; shuffle {cell.shuffle} does not "
            "apply"
        )
    if cell.dtype not in fmt.dtypes:
        return f"{cell.format} stores {'/'.join(fmt.dtypes)} only"
    if cell.access == "device" and cell.workers:
        return "device access uses no DataLoader workers (run with workers 0)"
    if cell.dtype not in DTYPES:
        return f"unknown dtype {cell.dtype}"
    return None


def plan_runs(experiment: Experiment, cells: list[Cell]) -> list[RunSpec]:
    """Runs in interleaved order: repeat 1 of every cell, then repeat 2, ... so that drift on
    a noisy machine spreads over all formats instead of favouring the ones run first."""
    runs = []
    for repeat in range(experiment.repeats):
        for cell in cells:
            if cell.skip:
                continue
            spec = RunSpec("", repeat, experiment.seed + repeat, cell, experiment)
            spec.key = run_key(spec.settings(), repeat)
            runs.append(spec)
    return runs
