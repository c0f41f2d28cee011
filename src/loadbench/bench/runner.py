"""`loadbench bench`: convert what is missing, then run the matrix, one process per run.

The results directory holds `bench.json` (schema), `env.json` (machine and versions),
`experiment.yaml` (the last experiment run into it) and `runs.jsonl`: one JSON object per
finished run, appended and fsynced when the run ends. Runs are keyed by a hash of their
settings and repeat, so running the same command again skips what is done: an experiment killed
at any point loses at most the run in progress. Failed runs are recorded with their error and
tried again on the next invocation; the report keeps the last record of every key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from loadbench import progress
from loadbench.bench.env import environment
from loadbench.bench.experiment import SCHEMA, Cell, Experiment, RunSpec, expand, plan_runs
from loadbench.bench.worker import base_record, clean, now
from loadbench.errors import LoadbenchError

RUNS = "runs.jsonl"


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


def read_runs(results_dir: str) -> list[dict[str, Any]]:
    """Every record of runs.jsonl; a line cut short by a crash is ignored."""
    path = os.path.join(results_dir, RUNS)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of a process killed while writing
    return records


def append_run(results_dir: str, record: dict[str, Any]) -> None:
    line = json.dumps(clean(record), allow_nan=False) + "\n"
    with open(os.path.join(results_dir, RUNS), "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def prepare_results(results_dir: str, experiment: Experiment, stores_dir: str) -> None:
    os.makedirs(results_dir, exist_ok=True)
    marker = os.path.join(results_dir, "bench.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            found = json.load(f).get("schema")
        if found != SCHEMA:
            raise LoadbenchError(
                f"{results_dir} holds results of schema {found}; this loadbench writes schema "
                f"{SCHEMA}: use another --out"
            )
    elif os.listdir(results_dir) and not os.path.isfile(os.path.join(results_dir, RUNS)):
        raise LoadbenchError(f"{results_dir} is not empty and is not a results directory")
    else:
        _write(marker, json.dumps({"schema": SCHEMA, "created": now()}))
    env_path = os.path.join(results_dir, "env.json")
    if not os.path.isfile(env_path):
        _write(env_path, json.dumps(environment(stores_dir), indent=1))
    _write(
        os.path.join(results_dir, "experiment.yaml"),
        yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False),
    )


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def store_dir_for(stores_dir: str, cell: Cell, source, options: dict) -> str:
    identity = json.dumps([source.identity, options], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in cell.dataset.label)[:40]
    return os.path.join(stores_dir, f"{slug}-{digest}", f"{cell.format}-{cell.dtype}")


def run_experiment(
    experiment: Experiment,
    results_dir: str,
    stores_dir: str | None = None,
    *,
    python: str = sys.executable,
    only_plan: bool = False,
) -> Outcome:
    """Run every pending run of `experiment` into `results_dir`."""
    from loadbench.conversion import convert
    from loadbench.sources import load_source

    stores_dir = stores_dir or default_stores_dir()
    results_dir = os.path.abspath(results_dir)
    outcome = Outcome()
    cells = expand(experiment)
    outcome.not_run = [(c.label, c.skip) for c in cells if c.skip]
    runs = plan_runs(experiment, cells)
    if only_plan:
        return outcome
    prepare_results(results_dir, experiment, stores_dir)
    done = {r["key"] for r in read_runs(results_dir) if r.get("status") == "ok"}
    pending = [r for r in runs if r.key not in done]
    outcome.skipped_done = len(runs) - len(pending)
    stores: dict[tuple, dict[str, Any]] = {}  # (dataset, format, dtype) -> store info or error
    sources: dict[str, Any] = {}
    for spec in pending:
        cell = spec.cell
        key = (cell.dataset.source, cell.format, cell.dtype)
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
            with progress.task(f"store {cell.dataset.label} {cell.format}/{cell.dtype}", None):
                store = convert(source, cell.format, path, cell.dtype, **options)
            m = store.manifest
            stores[key] = {
                "path": store.path,
                "info": {"bytes": m.bytes, "bytes_allocated": m.bytes_allocated,
                         "convert_time_s": m.convert_time_s, "images": store.counts,
                         "image_shape": list(m.image_shape), "reused": store.skipped},
            }  # fmt: skip
        except LoadbenchError as e:
            stores[key] = {"error": f"conversion failed: {e}"}
        except OSError as e:
            stores[key] = {"error": f"conversion failed: {type(e).__name__}: {e}"}
    with (
        tempfile.TemporaryDirectory(prefix="loadbench-runs-") as scratch,
        progress.task(f"bench {experiment.name}", len(pending)) as advance,
    ):
        for number, spec in enumerate(pending, 1):
            store = stores[(spec.cell.dataset.source, spec.cell.format, spec.cell.dtype)]
            label = f"[{number}/{len(pending)}] {spec.cell.label} repeat {spec.repeat + 1}"
            too_big = _device_too_small(spec, store)
            if too_big:
                if spec.repeat == 0:
                    outcome.not_run.append((spec.cell.label, too_big))
                advance(1)
                continue
            progress.console.print(f"[dim]{label}[/dim]", highlight=False)
            record = _one_run(spec, store, scratch, python)
            append_run(results_dir, record)
            if record["status"] == "ok":
                outcome.ok += 1
            else:
                outcome.failed += 1
                outcome.failures.append((label, record.get("error", "?")))
                progress.console.print(f"[red]failed:[/red] {record.get('error')}")
            advance(1)
    return outcome


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


def _one_run(spec: RunSpec, store: dict[str, Any], scratch: str, python: str) -> dict[str, Any]:
    if "error" in store:
        record = base_record(spec.to_json())
        record.update({"status": "failed", "error": store["error"], "finished": now()})
        return record
    spec.store_path = store["path"]
    payload = {**spec.to_json(), "store": store["info"]}
    spec_file = os.path.join(scratch, f"{spec.key}.json")
    result_file = os.path.join(scratch, f"{spec.key}.result.json")
    with open(spec_file, "w", encoding="utf-8") as f:
        json.dump(clean(payload), f)
    started = time.perf_counter()
    command = [python, "-m", "loadbench.bench.worker", spec_file, result_file]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=spec.experiment.timeout_s
        )
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:  # the child is killed; its stderr may be bytes
        returncode = None
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
    if os.path.isfile(result_file):
        with open(result_file, encoding="utf-8") as f:
            record = json.load(f)
        os.remove(result_file)
    else:  # killed (OOM, signal) or timed out: nothing was written by the run itself
        record = base_record(payload)
        if returncode is None:
            why = f"timed out after {spec.experiment.timeout_s:g} s"
        elif returncode < 0:
            why = f"killed by signal {-returncode}" + (
                " (out of memory?)" if -returncode == 9 else ""
            )
        else:
            why = f"exited with code {returncode} without a result"
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        record.update({
            "status": "failed", "error": why + (f": {' | '.join(tail)}" if tail else ""),
            "finished": now(),
        })  # fmt: skip
    record["wall_s"] = time.perf_counter() - started
    return record


def clear_results(results_dir: str) -> None:
    """Remove a results directory (used by --fresh)."""
    if os.path.isfile(os.path.join(results_dir, "bench.json")):
        shutil.rmtree(results_dir)
    elif os.path.exists(results_dir):
        raise LoadbenchError(f"{results_dir} is not a results directory; not removing it")
