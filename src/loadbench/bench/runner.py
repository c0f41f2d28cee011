"""`loadbench bench`: convert what is missing, then run the matrix, one process per run.

Results go to a results directory (see `records.py`): one record per finished run, appended
and fsynced when the run ends. Runs are keyed by a hash of their settings and repeat, so running
the same command again skips what is done: an experiment killed at any point loses at most the
run in progress. Failed runs are recorded with their error and tried again on the next
invocation; the report keeps the last record of every key.

Runs go in rounds, round r being repeat r of every configuration still going: all of them for a
fixed count, those whose median is not yet known well enough for adaptive repeats
(`repeats.py`, which decides after each round and writes repeats.json).

One bench writes a results directory at a time (`lock.py`). Belt and braces where a lock cannot
reach (a network file system): runs.jsonl is read again before each run and before its record
is appended, so a run already recorded ok is neither run nor recorded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from loadbench import progress
from loadbench.bench.env import environment
from loadbench.bench.experiment import Experiment
from loadbench.bench.launch import FreshInterpreters, Template
from loadbench.bench.lock import is_lock_file, results_lock
from loadbench.bench.matrix import Cell, RunSpec, expand
from loadbench.bench.records import (
    MARKER,
    RESULTS_SCHEMA,
    RUNS,
    RecordedOk,
    RunRecord,
    append_run,
    heal_runs,
)
from loadbench.bench.repeats import RepeatPlan, latest_by_key
from loadbench.bench.torchrun import Torchrun, settle
from loadbench.errors import LoadbenchError, writing
from loadbench.remote import join
from loadbench.util import now_iso, write_text_atomic


def default_stores_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "loadbench", "stores")


@dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    skipped_done: int = 0  # finished in an earlier invocation
    not_run: list[tuple[str, str]] = field(default_factory=list)  # (cell, why)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (run, error)
    notes: list[str] = field(default_factory=list)  # said to the user as they happen

    def note(self, text: str | None) -> None:
        if text:
            self.notes.append(text)
            progress.note(text)


def prepare_results(results_dir: str, experiment: Experiment, stores_dir: str) -> None:
    """Check that `results_dir` (made, and locked by this process) holds results of this
    schema or nothing, and write what describes them."""
    marker = os.path.join(results_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            found = json.load(f).get("schema")
        if found != RESULTS_SCHEMA:
            raise LoadbenchError(
                f"{results_dir} holds results of schema {found}; this loadbench writes schema "
                f"{RESULTS_SCHEMA}: use another --out"
            )
    elif _holds_other_files(results_dir):
        raise LoadbenchError(f"{results_dir} is not empty and is not a results directory")
    else:
        write_text_atomic(marker, json.dumps({"schema": RESULTS_SCHEMA, "created": now_iso()}))
    env_path = os.path.join(results_dir, "env.json")
    if not os.path.isfile(env_path):
        write_text_atomic(env_path, json.dumps(environment(stores_dir), indent=1))
    write_text_atomic(
        os.path.join(results_dir, "experiment.yaml"),
        yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False),
    )


def _holds_other_files(results_dir: str) -> bool:
    names = [n for n in os.listdir(results_dir) if not is_lock_file(n)]
    return bool(names) and RUNS not in names


def store_dir_for(stores_dir: str, cell: Cell, source, options: dict) -> str:
    """The store's directory under `stores_dir`, or its URL under the cell's object storage."""
    identity = json.dumps([source.identity, options], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in cell.dataset.label)[:40]
    base = stores_dir if cell.storage.local else cell.storage.url
    return join(base, f"{slug}-{digest}", f"{cell.format}-{cell.dtype}")


def _store_key(cell: Cell) -> tuple:
    storage = cell.storage
    return (cell.dataset.source, cell.format, cell.dtype, storage.url, storage.endpoint_url)


def run_experiment(
    experiment: Experiment,
    results_dir: str,
    stores_dir: str | None = None,
    *,
    python: str = sys.executable,
) -> Outcome:
    """Run every pending run of `experiment` into `results_dir`, as its only writer: another
    bench on it is refused (`lock.py`)."""
    stores_dir = stores_dir or default_stores_dir()
    results_dir = os.path.abspath(results_dir)
    outcome = Outcome()
    cells = expand(experiment)
    outcome.not_run = [(c.label, c.skip) for c in cells if c.skip]
    with writing(results_dir, "making the results directory"):
        os.makedirs(results_dir, exist_ok=True)
    nodes = experiment.distributed.nnodes if experiment.distributed is not None else 1
    with results_lock(results_dir, per_host=nodes > 1) as took_over:
        outcome.note(took_over)
        with writing(results_dir, "writing the results directory"):
            prepare_results(results_dir, experiment, stores_dir)
        outcome.note(heal_runs(results_dir))
        recorded = RecordedOk(results_dir)
        _run_rounds(experiment, RepeatPlan(experiment, cells), recorded, stores_dir, python,
                    outcome)  # fmt: skip
    return outcome


@dataclass
class _Bench:
    """What the rounds of one bench share: stores converted, the run processes, progress."""

    experiment: Experiment
    recorded: RecordedOk
    stores_dir: str
    python: str
    outcome: Outcome
    scratch: str
    stores: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    processes: Any = None
    done: int = 0  # runs run by this bench
    total: int = 0  # runs run and still planned

    def run(self, pending: list[RunSpec], advance) -> None:
        """Convert what `pending` needs that is not converted yet, then run it."""
        missing = [s for s in pending if _store_key(s.cell) not in self.stores]
        self.stores.update(convert_stores(self.experiment, missing, self.stores_dir))
        if self.processes is None:
            self.processes = launcher(self.experiment, self.python)
        for spec in pending:
            self.done += 1
            label = f"[{self.done}/{self.total}] {spec.cell.label} repeat {spec.repeat + 1}"
            _run_one(spec, self.stores[_store_key(spec.cell)], label, self.recorded,
                     self.scratch, self.processes, self.outcome)  # fmt: skip
            advance(1)


def _run_rounds(experiment: Experiment, plan: RepeatPlan, recorded: RecordedOk,
                stores_dir: str, python: str, outcome: Outcome) -> None:  # fmt: skip
    """Round r runs repeat r of every cell still going (all of them, for a fixed count); after
    each, `plan` decides from runs.jsonl which cells go on, and repeats.json says so."""
    results_dir = recorded.results_dir
    with tempfile.TemporaryDirectory(prefix="loadbench-runs-") as scratch:
        bench = _Bench(experiment, recorded, stores_dir, python, outcome, scratch)
        bench.total = plan.planned(-1, recorded.current())
        try:
            with progress.task(f"bench {experiment.name}", bench.total,
                               average_over_s=24 * 3600) as advance:  # fmt: skip
                for repeat in range(plan.most):
                    specs = plan.round(repeat)
                    if not specs:
                        break
                    pending = [s for s in specs if s.key not in recorded.current()]
                    outcome.skipped_done += len(specs) - len(pending)
                    if pending:
                        bench.run(pending, advance)
                    plan.after_round(repeat, specs, latest_by_key(results_dir), recorded.current())
                    with writing(results_dir, "writing repeats.json in"):
                        plan.write(results_dir)
                    bench.total = bench.done + plan.planned(repeat, recorded.current())
                    advance(0, total=bench.total)
        finally:
            if bench.processes is not None:
                bench.processes.close()


def _run_one(spec: RunSpec, store: dict[str, Any], label: str, recorded: RecordedOk,
             scratch: str, processes, outcome: Outcome) -> None:  # fmt: skip
    """Run one spec (unless it cannot run, or is recorded ok since the bench started) and
    record it."""
    too_big = _device_too_small(spec, store)
    if too_big:
        if spec.repeat == 0:
            outcome.not_run.append((spec.cell.label, too_big))
        return
    if spec.key in recorded.current():
        outcome.skipped_done += 1
        return
    progress.console.print(f"[dim]{label}[/dim]", highlight=False)
    record = _one_run(spec, store, scratch, processes)
    if record is None:  # a multi-node run recorded by the node of its rank 0
        return
    if record.key in recorded.current():
        outcome.note(f"{label} was recorded by another process meanwhile; kept that record")
        return
    append_run(recorded.results_dir, record)
    if record.status == "ok":
        outcome.ok += 1
    else:
        outcome.failed += 1
        outcome.failures.append((label, record.error or "?"))
        progress.console.print(f"[red]failed:[/red] {record.error}")


def convert_stores(
    experiment: Experiment, pending: list[RunSpec], stores_dir: str
) -> dict[tuple, dict[str, Any]]:
    """The store of every (dataset, format, dtype) the pending runs need, converted when missing
    (an identical store is reused). A conversion that fails becomes an error its runs record."""
    from loadbench.conversion import convert
    from loadbench.sources import load_source

    stores: dict[tuple, dict[str, Any]] = {}
    sources: dict[str, Any] = {}
    for spec in pending:
        cell = spec.cell
        key = _store_key(cell)
        if key in stores:
            continue
        try:
            ds = cell.dataset
            if ds.source not in sources:
                options = {**ds.options, **({"limit": ds.limit} if ds.limit else {})}
                sources[ds.source] = load_source(ds.source, **options).in_memory()
            source = sources[ds.source]
            options = experiment.format_options.get(cell.format, {})
            path = store_dir_for(stores_dir, cell, source, options)
            where = "" if cell.storage.local else f" @{cell.storage.label}"
            what = f"store {cell.dataset.label} {cell.format}/{cell.dtype}{where}"
            with progress.task(what, None):
                store = convert(
                    source, cell.format, path, cell.dtype,
                    storage_options=cell.storage.options(), **options,
                )  # fmt: skip
            m = store.manifest
            stores[key] = {
                "path": store.path,  # identity and created: which store the run must read
                "info": {"bytes": m.bytes, "bytes_allocated": m.bytes_allocated,
                         "convert_time_s": m.convert_time_s, "images": store.counts,
                         "image_shape": list(m.image_shape), "reused": store.skipped,
                         "identity": m.identity, "created": m.created},
            }  # fmt: skip
        except LoadbenchError as e:
            stores[key] = {"error": f"conversion failed: {e}"}
        except OSError as e:
            stores[key] = {"error": f"conversion failed: {type(e).__name__}: {e}"}
    return stores


def _device_too_small(spec: RunSpec, store: dict[str, Any]) -> str | None:
    """Why `device` access cannot hold this store's splits in the device's free memory."""
    if spec.cell.access != "device" or "info" not in store:
        return None
    import numpy as np
    import psutil

    from loadbench.formats import DTYPES

    info = store["info"]
    needed = sum(info["images"].values()) * int(np.prod(info["image_shape"]))
    needed *= np.dtype(DTYPES[spec.cell.dtype]).itemsize
    device = spec.experiment.device
    free, where = psutil.virtual_memory().available, "RAM"
    if device != "cpu":
        from loadbench.bench.env import gpu_free_bytes

        gpu_free = gpu_free_bytes()
        if gpu_free is not None:
            free, where = gpu_free, "GPU memory"
    if needed > 0.8 * free:
        return (
            f"device access needs {needed / 2**30:.1f} GiB resident, more than 80% of the "
            f"{free / 2**30:.1f} GiB of free {where}"
        )
    return None


def launcher(experiment: Experiment, python: str):
    """How each run's process starts (see `launch.py`)."""
    if experiment.distributed is not None:  # each run under torchrun (bench/torchrun.py)
        return Torchrun(python, experiment.distributed)
    if experiment.fresh_interpreter or not hasattr(os, "fork"):
        return FreshInterpreters(python)
    return Template(python)


def _one_run(spec: RunSpec, store: dict[str, Any], scratch: str, processes) -> RunRecord | None:
    if "error" in store:
        return spec.record().fail(store["error"])
    spec.store_path, spec.store = store["path"], store["info"]
    spec_file = os.path.join(scratch, f"{spec.key}.json")
    result_file = os.path.join(scratch, f"{spec.key}.result.json")
    log_file = os.path.join(scratch, f"{spec.key}.log")
    write_text_atomic(spec_file, spec.model_dump_json())
    started = time.perf_counter()
    returncode = processes.run(spec_file, result_file, log_file, spec.experiment.timeout_s)
    with open(log_file, encoding="utf-8", errors="replace") as f:
        log = f.read()
    wrote_result = os.path.isfile(result_file)
    if wrote_result:
        with open(result_file, encoding="utf-8") as f:
            record = RunRecord.model_validate_json(f.read())
        os.remove(result_file)
    else:  # killed (OOM, signal) or timed out: nothing was written by the run itself
        record = spec.record().fail(_why_no_result(returncode, spec, log[-4000:]))
    if spec.experiment.distributed is not None:  # torchrun's verdict on every rank
        record = settle(record, returncode, log, wrote_result, spec.experiment.distributed.nnodes)
        if record is None:
            return None
    record.wall_s = time.perf_counter() - started
    return record


def _why_no_result(returncode: int | None, spec: RunSpec, stderr: str) -> str:
    """Why a run wrote no result, with the last lines it printed."""
    if returncode is None:
        why = f"timed out after {spec.experiment.timeout_s:g} s"
    elif returncode < 0:
        why = f"killed by signal {-returncode}" + (" (out of memory?)" if -returncode == 9 else "")
    else:
        why = f"exited with code {returncode} without a result"
    tail = stderr.strip().splitlines()[-3:] if stderr else []
    return why + (f": {' | '.join(tail)}" if tail else "")
