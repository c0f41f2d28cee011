"""Everything a training run is told, in one validated place (CLI flags and YAML keys alike).

Each option is declared once, next to what it configures: the model's (models.py), the
optimizer's and schedule's (optim.py), the loaders' (batches.py), the epoch order's (order.py),
augmentation (augment.py), splits and normalisation (splits.py), the chunk cache
(formats/chunked.py), the read-through cache (storefiles.py), and the run's own (here).
`TrainConfig` is made from those declarations, and so are the `train` and `lr-find` flags.

Keys are the CLI's long option names with underscores: `--batch-size 64` on the command line is
`batch_size: 64` in a `--config` YAML file. Command-line values win over the file's. An unknown
key or a bad value is one error that names it.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from loadbench.errors import LoadbenchError
from loadbench.formats.chunked import CHUNK_CACHE_OPTIONS
from loadbench.options import Option, OptionGroup, fields
from loadbench.sources import source_options
from loadbench.sources.base import COMMON_OPTIONS
from loadbench.storefiles import READ_THROUGH_OPTIONS
from loadbench.training.augment import AUGMENT_OPTIONS
from loadbench.training.batches import LOADER_OPTIONS
from loadbench.training.models import list_models, model_options
from loadbench.training.optim import OPTIMIZER_OPTIONS, SCHEDULE_OPTIONS
from loadbench.training.order import ORDER_OPTIONS
from loadbench.training.splits import SPLIT_OPTIONS

FRAMEWORKS = ("torch", "keras")
GRAPHS = ("eager", "compiled", "xla")


def _device(value: Any) -> str:
    value = str(value)
    if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


RUN_OPTIONS = {
    "epochs": Option(10, "epochs", kind=int, above=0),
    "early_stopping": Option(
        None, "stop after N epochs without val-loss gain; restore the best", kind=int, above=0
    ),
    "kfold": Option(None, "k-fold cross-validation on the training split", kind=int, minimum=2),
    "device": Option("auto", "auto|cpu|cuda|cuda:N (auto: cuda when present)", parse=_device),
    "amp": Option(False, "mixed precision (fp16 on CUDA, bf16 on CPU)", kind=bool),
    "compile": Option(False, "torch.compile the model (compile time reported apart)", kind=bool),
    "framework": Option(
        "torch",
        "what trains the model: PyTorch, or Keras 3 on TensorFlow (frameworks/)",
        choices=FRAMEWORKS,
    ),
    "graph": Option(
        None,
        "how the framework runs a step (keras: run_eagerly, tf.function or jit_compile; "
        "torch: eager or torch.compile)",
        choices=GRAPHS,
        shown="torch: eager (compiled with --compile); keras: compiled",
    ),
    "timing": Option(
        "overlap",
        "overlap: no host-device sync inside an epoch, as real training runs (CUDA events time "
        "compute); sync: sync after every step (load and compute apart, no overlap)",
        choices=("overlap", "sync"),
    ),
    "seed": Option(
        0,
        "seeds Python, NumPy and torch, and a source given as DATA (its resplit, carved "
        "splits and generated images) unless its spec sets ?seed=",
        kind=int,
    ),
    "smooth": Option(
        0.0, "EMA smoothing of the curves plot, 0-0.99", kind=float, minimum=0, below=1
    ),
    "overfit_batch": Option(False, "only check that one batch can be learnt to 100%", kind=bool),
    "out": Option(None, "run directory", shown="runs/<time>-<model>"),
}
MODEL_CHOICE = {
    "model": Option("cnn-blocks", ", ".join(spec.name for spec in list_models())),
}
# Source options, for DATA given as a source spec; `seed` and `val_ratio` are the run's own
# (the run's seed seeds the source too; its val_ratio carves val from train as a source's does).
SOURCE_GROUP = OptionGroup.of(
    "Source options (DATA a source)",
    {k: v for k, v in COMMON_OPTIONS.items() if k not in ("seed", "val_ratio")},
    owned=source_options(),
)
# The options of a training run, as `--help` groups them. Model and source options are kept as
# given and checked by the model or source they are for.
GROUPS = (
    OptionGroup.of("Model", MODEL_CHOICE, owned=model_options()),
    OptionGroup.of("Optimizer and schedule", OPTIMIZER_OPTIONS, SCHEDULE_OPTIONS),
    OptionGroup.of(
        "Data and loading",
        LOADER_OPTIONS,
        AUGMENT_OPTIONS,
        SPLIT_OPTIONS,
        ORDER_OPTIONS,
        CHUNK_CACHE_OPTIONS,
        READ_THROUGH_OPTIONS,
    ),
    OptionGroup.of("Run", RUN_OPTIONS),
    SOURCE_GROUP,
)
MODEL_OPTION_KEYS = tuple(name for name, owners in GROUPS[0].options.items() if "" not in owners)
SOURCE_OPTION_KEYS = tuple(SOURCE_GROUP.options)
# The epoch-order keys and their defaults: training's, experiments', and those of benchmark runs
# recorded before the keys existed.
ORDER_DEFAULTS = {
    "shuffle": ORDER_OPTIONS["shuffle"].default,
    "shuffle_window": ORDER_OPTIONS["shuffle_window"].default,
    "chunk_cache_mb": CHUNK_CACHE_OPTIONS["chunk_cache_mb"].default,
}


def _forwarded_field(name: str, owners: dict[str, Option]) -> tuple[Any, Any]:
    """A model or source option in a config: the value as given (None: the default), checked
    by the model or source it is for when that is built; its type when every owner agrees."""
    kinds = {option.kind for option in owners.values() if option.parse is None}
    typed = len(kinds) == 1 and not any(option.parse for option in owners.values())
    annotation = kinds.pop() if typed else Any
    help = "; ".join(f"{owner}: {option.help}" for owner, option in owners.items())
    return annotation | None, Field(None, description=help)


def _fields() -> dict[str, Any]:
    out: dict[str, Any] = {
        "data": (str, Field(description="a store made by `loadbench convert`, or a source spec"))
    }
    for group in GROUPS:
        for name, owners in group.options.items():
            if name in MODEL_OPTION_KEYS or name in SOURCE_OPTION_KEYS:
                out[name] = _forwarded_field(name, owners)
            else:
                out.update(fields({name: owners[""]}))
    return out


def graph_settings(values: dict[str, Any]) -> dict[str, Any]:
    """`graph` in each framework's own terms: torch's compiled graph is `compile` (torch.compile)
    and torch has no XLA graph; `compile` with an eager graph contradicts itself."""
    framework, graph = values.get("framework") or "torch", values.get("graph")
    try:
        compiled = bool(RUN_OPTIONS["compile"].coerce(values.get("compile")))
    except ValueError:
        return values  # the field's own check says what is wrong
    if graph == "eager" and compiled:
        raise LoadbenchError(
            "--compile with --graph eager asks for both: leave one out (torch: --graph compiled "
            "is --compile)"
        )
    if framework == "torch" and graph == "xla":
        raise LoadbenchError(
            "--graph xla is Keras' jit_compile (--framework keras); torch runs --graph eager or "
            "compiled (torch.compile)"
        )
    if framework == "torch" and graph == "compiled":
        return {**values, "compile": True}
    return values


def resolved_graph(config) -> str:
    """The graph a run's steps run as: `graph` when given, else keras compiled and torch eager
    (compiled with `compile`)."""
    if config.graph is not None:
        return config.graph
    return "compiled" if config.framework == "keras" or config.compile else "eager"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _graph_in_its_framework(cls, values: Any) -> Any:
        return graph_settings(values) if isinstance(values, dict) else values

    def model_options(self) -> dict[str, Any]:
        """The model options that were given (the rest take the model's defaults)."""
        return {k: getattr(self, k) for k in MODEL_OPTION_KEYS if getattr(self, k) is not None}

    def source_options(self) -> dict[str, Any]:
        """The source options that were given (for DATA that is a source spec)."""
        return {k: getattr(self, k) for k in SOURCE_OPTION_KEYS if getattr(self, k) is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


TrainConfig = create_model(
    "TrainConfig", __base__=_Config, __doc__="A training run. Defaults are the ones a first run "
    "should use.", **_fields(),
)  # fmt: skip


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
