"""An experiment expanded: its cells (one combination of the matrix each) and its runs (a cell
and a repeat), each run keyed by a hash of its settings and its repeat.

A `RunSpec` is everything one run needs. The runner writes it as JSON for the run's own process
(a fork of the template, a fresh interpreter, or every rank under torchrun), which reads it back
as the same typed object.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loadbench.bench.experiment import Dataset, Experiment, Storage
from loadbench.bench.records import RESULTS_SCHEMA, RunRecord
from loadbench.errors import LoadbenchError
from loadbench.formats import DTYPES, get_format
from loadbench.training.config import ORDER_DEFAULTS
from loadbench.util import now_iso


class Cell(BaseModel):
    """One combination of the matrix (all repeats of it share the store and the settings)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Dataset
    format: str
    dtype: str
    access: str
    workers: int
    cache: str
    shuffle: str = "exact"
    storage: Storage = Field(default_factory=Storage)
    framework: str = "torch"
    graph: str = "eager"
    skip: str | None = None  # why this combination is not run
    mode: str | None = None  # a ceiling run's mode; None: the experiment's

    @property
    def label(self) -> str:
        if self.mode == "compute-only":
            graph = "" if self.graph == "eager" else f" {self.graph}"
            return f"{self.dataset.label} compute-only{graph}"
        order = "" if self.shuffle == "exact" else f" {self.shuffle}-shuffle"
        where = "" if self.storage.local else f" @{self.storage.label}"
        plain = self.mode == "loader-only" or (self.framework, self.graph) == ("torch", "eager")
        how = "" if plain else f" {self.framework}-{self.graph}"
        return (
            f"{self.dataset.label} {self.format}/{self.dtype} {self.access} w{self.workers}"
            f"{order} {self.cache}{where}{how}" + (f" {self.mode}" if self.mode else "")
        )


class RunSpec(BaseModel):
    """Everything one run needs, and the store it reads (set once the store is converted)."""

    model_config = ConfigDict(extra="forbid")

    key: str = ""
    repeat: int
    seed: int
    cell: Cell
    experiment: Experiment
    store_path: str = ""
    store: dict[str, Any] = Field(default_factory=dict)  # the store's size, images, timings

    @property
    def mode(self) -> str:
        return self.cell.mode or self.experiment.mode

    def settings(self) -> dict[str, Any]:
        """The resolved configuration of the run (what the key hashes, minus the repeat)."""
        e, c = self.experiment, self.cell
        if self.mode == "compute-only":  # the same for every format, access and worker count
            return {"schema": RESULTS_SCHEMA, "dataset": c.dataset.model_dump(),
                    "batch_size": e.batch_size, "epochs": e.epochs, "mode": self.mode,
                    "device": e.device, "train": e.train, **self.how_trained()}  # fmt: skip
        # Keys added after the first schema appear only when not at their default, so that
        # the runs of older results directories keep their keys.
        later = {"shuffle": c.shuffle, "shuffle_window": e.shuffle_window,
                 "chunk_cache_mb": e.chunk_cache_mb}  # fmt: skip
        remote = {} if c.storage.local else {"storage": c.storage.key()}
        return {
            **{k: v for k, v in later.items() if v != ORDER_DEFAULTS[k]},
            **remote,
            **self.how_trained(),
            **({"distributed": e.distributed.model_dump()} if e.distributed else {}),
            "schema": RESULTS_SCHEMA,
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
            "mode": self.mode,
            "device": e.device,
            "train": e.train,
        }

    def how_trained(self) -> dict[str, str]:
        """The framework and graph mode in the run's key where they are not what a run had
        before they were dimensions (torch, and compiled exactly when `train.compile`)."""
        c = self.cell
        if self.mode == "loader-only":
            return {}
        out = {"framework": c.framework} if c.framework != "torch" else {}
        if c.graph != self.experiment.implied_graph() or c.framework != "torch":
            out["graph"] = c.graph
        return out

    def record(self) -> RunRecord:
        """A new record of this run, with its configuration (status `running`)."""
        import os

        c, e = self.cell, self.experiment
        return RunRecord(
            schema=RESULTS_SCHEMA, key=self.key, experiment=e.name, dataset=c.dataset.label,
            source=c.dataset.source, format=c.format, dtype=c.dtype, access=c.access,
            workers=c.workers, cache=c.cache, shuffle=c.shuffle, storage=c.storage.label,
            mode=self.mode, batch_size=e.batch_size, epochs_planned=e.epochs, repeat=self.repeat,
            framework=None if self.mode == "loader-only" else c.framework,
            graph=None if self.mode == "loader-only" else c.graph,
            seed=self.seed, settings=self.settings(), store_path=self.store_path,
            store=self.store, started=now_iso(), pid=os.getpid(),
        )  # fmt: skip


def run_key(settings: dict[str, Any], repeat: int) -> str:
    text = json.dumps({"settings": settings, "repeat": repeat}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand(experiment: Experiment) -> list[Cell]:
    """Every cell of the matrix, with invalid combinations marked (not dropped): a user sees
    what was not run and why."""
    import itertools

    e = experiment
    cells = []
    # A loader-only experiment has no model; compute-only runs train torch models.
    frameworks = e.framework if e.mode == "train" else ["torch"]
    graphs = e.graph if e.mode != "loader-only" else [e.implied_graph()]
    for dataset, fmt, dtype, access, workers, shuffle, cache, storage, framework, graph in (
        itertools.product(e.datasets, e.formats, e.dtypes, e.access, e.workers, e.shuffle,
                          e.cache_states(), e.storage, frameworks, graphs)
    ):  # fmt: skip
        cell = Cell(dataset=dataset, format=fmt, dtype=dtype, access=access, workers=workers,
                    cache=cache, shuffle=shuffle, storage=storage, framework=framework,
                    graph=graph)  # fmt: skip
        cell.skip = _why_not(cell, e.format_options.get(fmt, {})) or _why_not_trained(cell, e)
        cells.append(cell)
    if e.mode == "compute-only":  # the model alone: one run per dataset, whatever the formats
        cells = [c for c in cells if c.skip] + compute_only_cells(cells)
    if e.ceilings:
        cells += ceiling_cells(cells)
    if e.distributed is not None:
        for cell in cells:
            if cell.skip is None and cell.framework == "keras":
                cell.skip = "keras runs are not distributed: torchrun runs torch's DDP"
            if cell.skip is None and get_format(cell.format).peer:
                cell.skip = (
                    f"{cell.format} runs its library's own loader, which is not sharded across "
                    "torchrun's processes"
                )
    return cells


def ceiling_cells(cells: list[Cell]) -> list[Cell]:
    """The runs that bound the training runs of `cells`: a loader-only twin of each (data as
    fast as its format and access mode give it, no model) and one compute-only run per
    dataset (the model on one device-resident batch: data for free), which depends only on
    the dataset's shape, the model and the batch size."""
    twins = {}  # one per loader: the framework and graph mode of a training run do not apply
    for cell in cells:
        if cell.skip is None:
            twin = cell.model_copy(update={"mode": "loader-only", "framework": "torch"})
            twins.setdefault(twin.label, twin)
    return list(twins.values()) + compute_only_cells(cells)


def compute_only_cells(cells: list[Cell]) -> list[Cell]:
    """One compute-only cell per dataset and torch graph mode of `cells`, on its first runnable
    store that loadbench reads itself (a peer's only when there is none). Keras runs have no
    compute-only twin."""
    compute: dict[tuple[str, str], Cell] = {}
    runnable = [c for c in cells if c.skip is None and c.framework == "torch"]
    for cell in sorted(runnable, key=lambda c: get_format(c.format).peer):
        access = "batch" if "batch" in get_format(cell.format).accesses else cell.access
        update = {"mode": "compute-only", "access": access, "workers": 0, "cache": "warm"}
        compute.setdefault((cell.dataset.label, cell.graph), cell.model_copy(update=update))
    return list(compute.values())


def _why_not(cell: Cell, options: dict[str, Any]) -> str | None:
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
    if not cell.storage.local:
        if fmt.peer and not fmt.reads_remote:
            return f"{cell.format} is a peer loader, which reads local stores only"
        if fmt.needs_local_file(options) and not cell.storage.cache_dir:
            return f"{cell.format} reads a real file: on object storage it needs storage.cache_dir"
    if cell.access == "device" and cell.workers:
        return "device access uses no DataLoader workers (run with workers 0)"
    if cell.dtype not in DTYPES:
        return f"unknown dtype {cell.dtype}"
    return None


def _why_not_trained(cell: Cell, experiment: Experiment) -> str | None:
    """Why a framework and graph mode cannot train from this cell's loader (None: they can)."""
    fmt = get_format(cell.format)
    if cell.framework == "torch":
        if cell.graph == "xla":
            return "xla is Keras' jit_compile; torch runs eager or compiled (torch.compile)"
        return None
    if missing := keras_missing():
        return missing
    from loadbench.frameworks.keras_data import check_keras_format
    from loadbench.frameworks.keras_run import check_keras_config
    from loadbench.training.config import TrainConfig

    settings = {**experiment.train, "data": "-", "framework": "keras", "graph": cell.graph,
                "access": cell.access, "shuffle": cell.shuffle, "compile": False}  # fmt: skip
    config = TrainConfig.model_validate(settings)
    try:  # what a Keras run would refuse, said before any store is converted
        check_keras_config(config)
        check_keras_format(fmt, config)
    except LoadbenchError as e:
        return f"keras: {e}"
    return None


def keras_missing() -> str | None:
    """Why Keras cannot run here (None: TensorFlow with Keras 3 is installed)."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
        return "keras needs TensorFlow: pip install 'loadbench[tf]'"
    return None


def plan_runs(experiment: Experiment, cells: list[Cell]) -> list[RunSpec]:
    """Every run the experiment may run, in interleaved order: repeat 1 of every cell, then
    repeat 2, ... so that drift on a noisy machine spreads over all formats instead of
    favouring the ones run first. With adaptive repeats, the rounds past `min` run only for
    the cells that still need them (`bench/repeats.py`)."""
    _, most = experiment.repeat_range()
    return [spec for repeat in range(most) for spec in plan_round(experiment, cells, repeat)]


def plan_round(experiment: Experiment, cells: list[Cell], repeat: int) -> list[RunSpec]:
    """Repeat `repeat` (from 0) of every runnable cell of `cells`. Its key hashes the settings
    and the repeat only, not the number of repeats: a fixed count and adaptive repeats share
    the keys of the repeats they both run, and a longer experiment extends a shorter one."""
    runs = []
    for cell in cells:
        if cell.skip:
            continue
        spec = RunSpec(repeat=repeat, seed=experiment.seed + repeat, cell=cell,
                       experiment=experiment)  # fmt: skip
        spec.key = run_key(spec.settings(), repeat)
        runs.append(spec)
    return runs
