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
    framework: [torch]                           # and/or keras (TensorFlow: `loadbench[tf]`)
    graph: [eager]                               # and/or compiled (torch.compile, tf.function), xla
    epochs: 3
    repeats: 10                                  # or {min: 3, max: 10, ci_pct: 2}: adaptive
    cache: warm                                  # warm | cold | both
    mode: train                                  # train | loader-only | compute-only
    ceilings: false                              # true: + loader-only and compute-only runs
    train: {model: cnn-blocks, batch_norm: true} # the keys of `loadbench train`
    distributed: {nproc_per_node: 2}             # optional: each run under torchrun (DDP)
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from loadbench.errors import LoadbenchError
from loadbench.formats import DTYPES, expand_names, get_format
from loadbench.formats.chunked import CHUNK_CACHE_OPTIONS
from loadbench.options import fields
from loadbench.remote import is_url, storage_options
from loadbench.sources import check_source_options
from loadbench.training.batches import ACCESS_MODES, LOADER_OPTIONS
from loadbench.training.config import RUN_OPTIONS, SOURCE_OPTION_KEYS, TrainConfig, explain
from loadbench.training.models import resolve_model_options
from loadbench.training.order import ORDER_OPTIONS

DTYPE_NAMES = tuple(DTYPES)
# train: real training; loader-only: the loader alone, no model (the data ceiling);
# compute-only: the model trained on one device-resident batch (the compute ceiling).
MODES = ("train", "loader-only", "compute-only")
# Which framework trains the model, and how: eager (op by op), compiled (torch.compile, or
# Keras' default tf.function graph) or xla (Keras' jit_compile; torch has no such mode here).
FRAMEWORKS = RUN_OPTIONS["framework"].choices
GRAPHS = RUN_OPTIONS["graph"].choices
SHUFFLES = ORDER_OPTIONS["shuffle"].choices


class Dataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="a source spec, as for `loadbench convert`")
    name: str | None = Field(None, description="label in results (default: from the spec)")
    limit: int | None = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, description="more source options")

    @model_validator(mode="after")
    def _source_options(self) -> Dataset:
        limit = {"limit": self.limit} if self.limit else {}
        try:
            check_source_options(self.source, {**self.options, **limit})
        except LoadbenchError as e:
            raise ValueError(str(e)) from None
        return self

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


class Storage(BaseModel):
    """Where a run's stores live: the local stores directory, or object storage."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        "local", description="'local' (the stores directory) or an fsspec URL prefix (s3://b/p)"
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS)"
    )
    cache_dir: str | None = Field(
        None, description="read through a local copy kept here (default: read in place)"
    )
    retries: int | None = Field(None, ge=0, description="attempts per request, with backoff")
    name: str | None = Field(None, description="label in results (default: from the URL)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value != "local" and not is_url(value):
            raise ValueError(f"{value!r} is neither 'local' nor a URL such as s3://bucket/prefix")
        return value.rstrip("/")

    @property
    def local(self) -> bool:
        return self.url == "local"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.local:
            return "local"
        return self.url.partition("://")[0] + ("+cache" if self.cache_dir else "")

    def options(self) -> dict[str, Any]:
        return storage_options(self.endpoint_url, self.retries)

    def key(self) -> dict[str, Any]:
        """What identifies the storage in a run's key: not the cache's path, nor the name."""
        return {"url": self.url, "endpoint_url": self.endpoint_url,
                "read_through": self.cache_dir is not None, "retries": self.retries}  # fmt: skip


class Distributed(BaseModel):
    """Each run under torchrun: DDP over `nproc_per_node` processes on each of `nnodes` nodes."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(ge=1, description="processes (ranks) per node")
    nnodes: int = Field(
        1, ge=1, description="nodes; more than 1 needs LOADBENCH_RDZV_ENDPOINT=host:port"
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class AdaptiveRepeats(BaseModel):
    """Repeats until the median is known well enough: after `min` repeats, a configuration
    gets another while the 95% interval of its median steady-state epoch time is wider than
    `ci_pct` percent of that median, up to `max` (the rule is in `bench/repeats.py`)."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(3, ge=2, description="repeats every configuration runs (an interval needs 2)")
    max: int = Field(10, ge=2, description="repeats no configuration goes beyond")
    ci_pct: float = Field(
        2.0, gt=0, le=100, description="stop once the interval is this % of the median or less"
    )

    @model_validator(mode="after")
    def _bounds(self) -> AdaptiveRepeats:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is more than max {self.max}")
        return self


class _Matrix(BaseModel):
    """The keys of an experiment that are its own (the training options it sets for every run
    are added from their declarations below)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    datasets: list[Dataset] = Field(min_length=1)
    formats: list[str] = Field(default_factory=lambda: ["all"])
    dtypes: list[Literal[DTYPE_NAMES]] = Field(default_factory=lambda: ["uint8"])
    format_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="{format: {option: value}}, as `loadbench convert` takes"
    )
    access: list[Literal[ACCESS_MODES]] = Field(default_factory=lambda: ["sample"])
    workers: list[int] = Field(default_factory=lambda: [0])
    shuffle: list[Literal[SHUFFLES]] = Field(
        default_factory=lambda: [ORDER_OPTIONS["shuffle"].default],
        description="epoch orders: exact (default) and/or block (chunk-aware, opt-in)",
    )
    framework: list[Literal[FRAMEWORKS]] = Field(
        default_factory=lambda: ["torch"],
        description="frameworks that train the model: torch and/or keras (TensorFlow backend)",
    )
    graph: list[Literal[GRAPHS]] = Field(
        default_factory=lambda: ["eager"],
        description="eager and/or compiled (torch.compile; Keras' tf.function) and/or xla "
        "(Keras' jit_compile); compile time is reported apart from epoch time",
    )
    repeats: int | AdaptiveRepeats = Field(
        10,
        description="runs per configuration, or {min, max, ci_pct} to repeat until the "
        "median epoch time is known to ci_pct percent",
    )
    cache: Literal["warm", "cold", "both"] = "warm"
    mode: Literal[MODES] = "train"
    ceilings: bool = Field(
        False,
        description="with mode train: add a loader-only run per configuration and a "
        "compute-only run per dataset, to name what bounds each training run",
    )
    train: dict[str, Any] = Field(default_factory=dict, description="keys of `loadbench train`")
    storage: list[Storage] = Field(
        default_factory=lambda: [Storage()],
        description="where the stores are: local and/or object storage, compared in one report",
    )
    timeout_s: float = Field(1800, gt=0, description="a run taking longer is stopped and failed")
    sample_period_s: float = Field(0.2, gt=0, description="telemetry sampling period")
    fresh_interpreter: bool = Field(
        False, description="a new Python per run, instead of a fork of a clean template"
    )
    distributed: Distributed | None = Field(
        None, description="run each run under torchrun (DDP), e.g. {nproc_per_node: 2}"
    )

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        try:
            return expand_names(value)
        except LoadbenchError as e:
            raise ValueError(str(e)) from None

    @field_validator("format_options")
    @classmethod
    def _format_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, options in value.items():
            try:
                get_format(name).parse_options(options)
            except LoadbenchError as e:
                raise ValueError(str(e)) from None
        return value

    @field_validator("repeats", mode="before")
    @classmethod
    def _repeats(cls, value: Any) -> Any:
        """One message per mistake, instead of pydantic's one per member of the union."""
        if isinstance(value, dict):
            try:
                return AdaptiveRepeats.model_validate(value)
            except ValidationError as e:
                raise ValueError(_said(e, "{min: 3, max: 10, ci_pct: 2}")) from None
        if isinstance(value, AdaptiveRepeats):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{value!r} is not a number of repeats (1 or more) nor {{min: 3, max: 10, "
                "ci_pct: 2}"
            )
        return value

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        return [{"url": v} if isinstance(v, str) else v for v in items]

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: list[int]) -> list[int]:
        least = LOADER_OPTIONS["workers"].minimum
        if not value or min(value) < least:
            raise ValueError(f"needs one or more worker counts >= {least}")
        return value

    @field_validator("train")
    @classmethod
    def _train(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(value) & MATRIX_KEYS)
        if clash:
            raise ValueError(f"{', '.join(clash)} are set by the matrix, not under train:")
        sourced = sorted(set(value) & set(SOURCE_OPTION_KEYS))
        if sourced:
            raise ValueError(
                f"{', '.join(sourced)} are source options: give them under datasets: "
                "(options: or limit:), where the stores are made"
            )
        try:
            config = TrainConfig.model_validate({"data": "-", **value})
        except ValidationError as e:
            raise ValueError(explain(e, "train option")) from None
        try:  # the model's own options, as the model will take them
            resolve_model_options(config.model, config.model_options())
        except LoadbenchError as e:
            raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _ceilings(self) -> _Matrix:
        if self.ceilings and self.mode != "train":
            raise ValueError(
                f"ceilings: true adds loader-only and compute-only runs beside train runs; "
                f"this experiment's mode is {self.mode}: set mode: train, or ceilings: false"
            )
        return self

    @model_validator(mode="after")
    def _graph_or_compile(self) -> _Matrix:
        """`train: {compile: true}` (torch.compile, from before `graph`) is `graph: [compiled]`;
        the two together would contradict each other where they differ."""
        if self.train.get("compile"):
            if "graph" in self.model_fields_set and self.graph != ["compiled"]:
                raise ValueError(
                    "train: {compile: true} and graph: say one thing: drop compile and list "
                    "the graph modes under graph:"
                )
            self.graph = ["compiled"]
        return self

    def implied_graph(self) -> str:
        """The graph mode a torch run had before `graph` was a dimension (kept out of run
        keys, so results of older experiments keep theirs)."""
        return "compiled" if self.train.get("compile") else "eager"

    @model_validator(mode="after")
    def _one_node_decides(self) -> _Matrix:
        if self.adaptive and self.distributed is not None and self.distributed.nnodes > 1:
            raise ValueError(
                "adaptive repeats are decided by each node's bench from runs.jsonl, and nodes "
                "could decide apart: use a fixed number of repeats with nnodes > 1"
            )
        return self

    def cache_states(self) -> list[str]:
        return ["warm", "cold"] if self.cache == "both" else [self.cache]

    @property
    def adaptive(self) -> AdaptiveRepeats | None:
        """The stopping rule of adaptive repeats; None for a fixed count."""
        return self.repeats if isinstance(self.repeats, AdaptiveRepeats) else None

    def repeat_range(self) -> tuple[int, int]:
        """The fewest and the most repeats a configuration gets (equal for a fixed count)."""
        rule = self.adaptive
        return (rule.min, rule.max) if rule else (self.repeats, self.repeats)


def _said(error: ValidationError, example: str | None = None) -> str:
    """Validation errors in one line, each as `where: what` (an unknown key with `example`,
    the keys that are known)."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {where!r}" + (f" (write {example})" if example else ""))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


# Training options an experiment sets for every run, from their declarations (the matrix sets
# access, workers and shuffle per cell). Experiments run 3 epochs unless told otherwise.
RUN_OPTIONS_SET = {
    "shuffle_window": ORDER_OPTIONS["shuffle_window"],
    "chunk_cache_mb": CHUNK_CACHE_OPTIONS["chunk_cache_mb"],
    "batch_size": LOADER_OPTIONS["batch_size"],
    "pin_memory": LOADER_OPTIONS["pin_memory"],
    "epochs": replace(RUN_OPTIONS["epochs"], default=3),
    "seed": RUN_OPTIONS["seed"],
    "device": RUN_OPTIONS["device"],
}
# Keys a run sets itself; they may not appear under `train:`.
MATRIX_KEYS = {"data", "out", "kfold", "resume", "overfit_batch", "access", "workers", "shuffle",
               "framework", "graph", *RUN_OPTIONS_SET}  # fmt: skip
Experiment = create_model(
    "Experiment", __base__=_Matrix, **fields(RUN_OPTIONS_SET),
    __doc__="The whole matrix. Defaults follow the study: 10 repeats, warm cache, real training.",
)  # fmt: skip


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
        raise LoadbenchError(f"{path}: {_said(e)}") from None
