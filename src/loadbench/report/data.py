"""A results directory as tables: one row per run (its latest record) and one per epoch.

Per run, the epochs are reduced to what the study compares: the first epoch (cold start) apart
from the steady state (the median of the later epochs), the data-stall share, accelerator
utilisation, where the loader's time went, peak memory, mean CPU, GPU use, bytes read. The runs
of the experiment's mode are the tables' rows; ceiling runs (`ceilings: true`) are kept apart.
What a record lacks (no GPU, an older schema, a failed run) becomes a missing value, not an
error.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from loadbench.bench.records import (
    MARKER,
    RESULTS_SCHEMA,
    RUNS,
    RunRecord,
    latest_records,
    steady_epochs,
)
from loadbench.errors import LoadbenchError
from loadbench.manifest import MANIFEST

# A row of a table (+ cache); storage is "local" or the label of an object storage;
# world_size is 1 but for distributed runs (ranks under torchrun).
# framework and graph: what trained the model ("" for loader-only runs, which have none).
CONFIG = ["format", "dtype", "access", "workers", "shuffle", "storage", "world_size", "framework",
          "graph"]  # fmt: skip
# What identifies a loader alone (a loader-only run's configuration).
LOADER_CONFIG = [c for c in CONFIG if c not in ("framework", "graph")]


@dataclass
class Results:
    path: str
    runs: pd.DataFrame  # ok runs of the experiment's mode, latest record per key
    epochs: pd.DataFrame  # one row per epoch of those runs
    failed: list[RunRecord]  # failed runs (latest record per key)
    env: dict[str, Any]
    experiment: dict[str, Any]
    schema: int | None
    notes: list[str] = field(default_factory=list)  # what is missing, said in the report
    # ok runs of the other modes: the loader-only and compute-only runs of `ceilings: true`
    ceilings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RUN_COLUMNS))
    # what the report computes once from these tables (the tests of `report/comparisons.py`)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(self.runs["dataset"])) if len(self.runs) else []

    @property
    def has_gpu(self) -> bool:
        return bool(len(self.runs)) and self.runs["gpu_util_pct_mean"].notna().any()


def warm_only(frame: pd.DataFrame) -> pd.DataFrame:
    """The warm-cache rows when there are any (cold ones are compared apart), else all rows."""
    if "warm" in set(frame["cache"]):
        return frame[frame["cache"] == "warm"]
    return frame


def _json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def load_results(path: str) -> Results:
    """Read a results directory written by `loadbench bench`."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path) or not (
        os.path.isfile(marker) or os.path.isfile(os.path.join(path, RUNS))
    ):
        raise LoadbenchError(
            f"{path} is not a results directory (no bench.json or runs.jsonl); "
            "make one with `loadbench bench --out DIR`"
        )
    notes = []
    schema = _json(marker).get("schema")
    if schema != RESULTS_SCHEMA:
        notes.append(
            f"results schema {schema} (this report reads {RESULTS_SCHEMA}): columns it lacks "
            "are shown as missing"
        )
    import yaml

    experiment: dict[str, Any] = {}
    exp_file = os.path.join(path, "experiment.yaml")
    if os.path.isfile(exp_file):
        with open(exp_file, encoding="utf-8") as f:
            experiment = yaml.safe_load(f) or {}
    latest, unreadable = latest_records(path)
    ok = [r for r in latest if r.status == "ok"]
    failed = [r for r in latest if r.status != "ok"]
    if unreadable:
        notes.append(_unreadable_note(unreadable))
    if not latest:
        notes.append("no finished run yet: runs.jsonl is empty or missing")
    elif not ok:
        notes.append("every recorded run failed: there is nothing to measure")
    main = experiment.get("mode") or (ok[0].mode if ok else None)
    ceilings = [r for r in ok if r.mode not in (main, None)]
    ok = [r for r in ok if r.mode in (main, None)]
    runs = pd.DataFrame([run_row(r) for r in ok], columns=RUN_COLUMNS)
    runs["stopped"] = runs["key"].map(_stopped(path))
    epochs = pd.DataFrame(
        [epoch_row(r, e) for r in ok for e in r.epochs or []], columns=EPOCH_COLUMNS
    )
    env = _json(os.path.join(path, "env.json"))
    if not env:
        notes.append("env.json is missing: the machine is not described")
    return Results(path, runs, epochs, failed, env, experiment, schema, notes,
                   pd.DataFrame([run_row(r) for r in ceilings], columns=RUN_COLUMNS))  # fmt: skip


def _stopped(path: str) -> dict[str, str]:
    """Run key -> why its configuration got no more repeats, from the bench's repeats.json
    (adaptive repeats; empty for a fixed count or results written before the file existed)."""
    cells = _json(os.path.join(path, "repeats.json")).get("cells") or {}
    return {key: cell["stopped"] for cell in cells.values() if isinstance(cell, dict)
            and cell.get("stopped") and cell["stopped"] != "fixed count"
            for key in cell.get("keys") or []}  # fmt: skip


def planned_repeats(experiment: dict[str, Any]) -> str | None:
    """The repeats an experiment asked for, in words: "10", or the adaptive rule."""
    repeats = experiment.get("repeats")
    if isinstance(repeats, dict):
        return (f"{repeats.get('min')}-{repeats.get('max')}, adaptive: more while the 95% "
                f"interval of the median epoch time is wider than {repeats.get('ci_pct')}% of "
                "it")  # fmt: skip
    return None if repeats is None else str(repeats)


def _unreadable_note(lines: list[str], shown: int = 10) -> str:
    """The lines of runs.jsonl left out, by number and why (the first `shown` of them)."""
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    listed = "; ".join(lines[:shown]) + more
    return f"{len(lines)} line(s) of {RUNS} are not run records and are left out: {listed}"


# Where a loader's time goes, per epoch, summed over its worker processes (`stages.py`).
STAGES = ("read_s", "decode_s", "collate_s", "augment_s", "h2d_s")

RUN_COLUMNS = [
    "key", "dataset", "format", "dtype", "access", "workers", "shuffle", "cache", "mode",
    "repeat", "seed", "epochs", "first_epoch_s", "epoch_s", "total_time_s", "time_to_first_batch_s",
    "images_per_s", "stall_share", "data_wait_s", "compute_s", "peak_rss_bytes", "cpu_pct_mean",
    "system_cpu_pct_mean", "read_bytes", "gpu_util_pct_mean", "gpu_mem_bytes_max",
    "cuda_max_allocated_bytes", "store_bytes", "bytes_per_image", "convert_time_s",
    "final_accuracy", "classes", "lossy", "eviction_effective", "order_jump_ratio",
    "order_same_class", "storage", "read_through_hit_rate", "world_size", "straggler_ratio",
    "rank_images_per_s", "au", "timing", *(f"stage_{s}" for s in STAGES), "stage_bytes_read",
    "stopped",  # adaptive repeats: why the run's configuration got no more (repeats.json)
    "cpu_budget", "peer", "framework", "graph", "compile_time_s",
]  # fmt: skip
EPOCH_COLUMNS = [
    "key", "dataset", "format", "dtype", "access", "workers", "shuffle", "storage", "cache",
    "framework", "graph", "repeat", "epoch",
    "time_s", "train_loss", "train_accuracy", "evaluated", "eval_loss", "eval_accuracy",
]  # fmt: skip


# What a run row takes from its record as it is.
RECORD_KEYS = ["key", "dataset", "format", "dtype", "access", "workers", "shuffle", "cache",
               "mode", "repeat", "seed"]  # fmt: skip


@functools.lru_cache(maxsize=256)
def is_peer(name: str | None) -> bool:
    """Whether records' format `name` is a peer loader (another project's library); False for
    a name this loadbench does not know."""
    return peer_mark(name) != ""


@functools.lru_cache(maxsize=256)
def peer_mark(name: str | None) -> str:
    """How a configuration's name marks a peer loader: " (peer)", or " (peer, own order)" for
    one that draws its library's epoch order instead of loadbench's; "" for the rest."""
    from loadbench.formats import get_format, is_format

    if not name or not is_format(name) or not get_format(name).peer:
        return ""
    return " (peer, own order)" if get_format(name).own_order else " (peer)"


def _get(d: dict[str, Any] | None, *keys, default=None):
    for key in keys:
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return default
        d = d[key]
    return d


def _values(epochs: list[dict[str, Any]], key: str) -> list[float]:
    return [e[key] for e in epochs if e.get(key) is not None]


def run_row(r: RunRecord) -> dict[str, Any]:
    """One run reduced: the first epoch apart, the steady state as the median of the rest."""
    epochs = r.epochs or []
    steady = steady_epochs(epochs)
    times = _values(steady, "time_s")
    wall = sum(times)
    images = sum((r.store.get("images") or {}).values()) or None
    gpu_util = _values(epochs, "gpu_util_pct_mean")
    gpu_mem = _values(epochs, "gpu_mem_used_bytes_max")
    stages = [e["stages"] for e in steady if e.get("stages")]
    return {
        **{k: getattr(r, k) for k in RECORD_KEYS},
        "epochs": len(epochs),
        "first_epoch_s": epochs[0].get("time_s") if epochs else None,
        "epoch_s": statistics.median(times) if times else None,
        "total_time_s": r.total_time_s,
        "time_to_first_batch_s": r.time_to_first_batch_s,
        "images_per_s": _median(_values(steady, "images_per_s")),
        "stall_share": sum(_values(steady, "data_wait_s")) / wall if wall else None,
        "data_wait_s": _median(_values(steady, "data_wait_s")),
        "compute_s": _median(_values(steady, "compute_s")),
        "peak_rss_bytes": max(_values(epochs, "peak_rss_bytes"), default=None),
        "cpu_pct_mean": _median(_values(steady, "cpu_pct_mean")),
        "system_cpu_pct_mean": _median(_values(steady, "system_cpu_pct_mean")),
        "read_bytes": sum(_values(epochs, "read_bytes")) if epochs else None,
        "gpu_util_pct_mean": _median(gpu_util),
        "gpu_mem_bytes_max": max(gpu_mem, default=None),
        "cuda_max_allocated_bytes": r.cuda_max_allocated_bytes,
        "store_bytes": r.store.get("bytes"),
        "bytes_per_image": (r.store.get("bytes") or 0) / images if images else None,
        "convert_time_s": r.store.get("convert_time_s"),
        "final_accuracy": _get(r.final, "accuracy"),
        **_store_facts(r),
        "eviction_effective": _get(r.eviction, "effective"),
        "order_jump_ratio": _get(r.order_quality, "jump_ratio"),
        "order_same_class": _get(r.order_quality, "same_class"),
        "storage": r.storage,
        "read_through_hit_rate": _hit_rate(epochs),
        "world_size": r.world_size or 1,
        "straggler_ratio": _median(_values(steady, "straggler_ratio")),
        "rank_images_per_s": _per_rank(steady, "images_per_s"),
        "au": _median(_values(steady, "au")),
        "timing": _timing(r),
        **{f"stage_{k}": _median(_values(stages, k)) for k in (*STAGES, "bytes_read")},
        # Records before the budget was stated: its workers, or the main process.
        "cpu_budget": r.cpu_budget or max(1, r.workers or 0),
        "peer": r.peer if r.peer is not None else is_peer(r.format),
        **how_trained(r),
        "compile_time_s": _get(r.final, "compile_time_s"),
    }


def how_trained(r: RunRecord) -> dict[str, str]:
    """{framework, graph} of a run: as recorded; for records from before they were recorded,
    torch, compiled exactly when the experiment's `train.compile` said so; "" for both where
    no model ran (loader-only)."""
    if r.mode == "loader-only":
        return {"framework": "", "graph": ""}
    compiled = bool(_get(r.settings, "train", "compile"))
    return {"framework": r.framework or "torch",
            "graph": r.graph or ("compiled" if compiled else "eager")}  # fmt: skip


def _store_facts(r: RunRecord) -> dict[str, Any]:
    """The run's class count (chance level: 1 / classes) and whether its format is lossy: from
    the record, else from the store's manifest while the store is still there, else from the
    format registry (lossy only); None where none of them tells."""
    manifest = _json(os.path.join(r.store_path, MANIFEST)) if r.store_path else {}
    classes = _get(r.final, "classes") or len(manifest.get("classes") or []) or None
    lossy = manifest.get("lossy")
    if lossy is None and r.format:
        lossy = _registry_lossy(r.format, r.dtype, _get(r.settings, "format_options") or {})
    return {"classes": classes, "lossy": lossy}


def _registry_lossy(name: str, dtype: str | None, options: dict[str, Any]) -> bool | None:
    from loadbench.formats import get_format, is_format

    if not is_format(name):
        return None
    try:
        fmt = get_format(name)
        return bool(fmt.is_lossy(fmt.resolve_options(dtype or "uint8", options)))
    except (LoadbenchError, KeyError, TypeError, ValueError):
        return None


def _timing(r: RunRecord) -> str | None:
    """How a train run's epochs were timed: as recorded, else sync (every step synchronised:
    loadbench's only timing before the choice was recorded); None for runs without a model."""
    if r.mode not in ("train", "compute-only", None):
        return None
    return next((e["timing"] for e in r.epochs or [] if e.get("timing")), "sync")


def _per_rank(epochs: list[dict[str, Any]], key: str) -> tuple[float, ...] | None:
    """Each rank's median of `key` over `epochs` (distributed runs; None otherwise)."""
    ranks: dict[int, list[float]] = {}
    for e in epochs:
        for r in e.get("ranks") or []:
            if r.get(key) is not None:
                ranks.setdefault(r["rank"], []).append(r[key])
    return tuple(statistics.median(ranks[k]) for k in sorted(ranks)) if ranks else None


def _hit_rate(epochs: list[dict[str, Any]]) -> float | None:
    """Files served by the read-through cache over files read, over the whole run."""
    counts = [e["read_through"] for e in epochs if e.get("read_through")]
    hits = sum(c["hits"] for c in counts)
    total = hits + sum(c["misses"] for c in counts)
    return hits / total if total else None


def epoch_row(r: RunRecord, e: dict[str, Any]) -> dict[str, Any]:
    row = {k: getattr(r, k) for k in ("key", "dataset", "format", "dtype", "access", "workers",
                                      "cache", "repeat", "shuffle", "storage")}  # fmt: skip
    row.update(how_trained(r))
    row.update({k: e.get(k) for k in ("epoch", "time_s", "train_loss", "train_accuracy")})
    # The split evaluated each epoch: val, or test where the store had none (records before
    # the split was named call either "val").
    evaluated = next((s for s in ("val", "test") if e.get(f"{s}_loss") is not None), None)
    row["evaluated"] = evaluated
    row["eval_loss"] = e.get(f"{evaluated}_loss") if evaluated else None
    row["eval_accuracy"] = e.get(f"{evaluated}_accuracy") if evaluated else None
    return row


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
