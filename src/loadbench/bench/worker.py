"""One benchmark run, in a process of its own: `python -m loadbench.bench.worker SPEC RESULT`.

A fresh interpreter per run means no page-cache mappings, allocator state, compiled kernels or
open handles carry over from one run to the next. The result is written atomically to RESULT;
a failure is written as a failed record with the error, and a process that is killed writes
nothing (the runner records that).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from datetime import datetime
from typing import Any

SCHEMA = 1
RANK_FAILED = "loadbench: failed on rank"  # a rank's error line in torchrun's log


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def base_record(spec: dict[str, Any]) -> dict[str, Any]:
    s = spec["settings"]
    return {
        "schema": SCHEMA,
        "key": spec["key"],
        "status": "running",
        "experiment": spec["experiment"]["name"],
        "dataset": spec["cell"]["label"],
        "source": s["dataset"]["source"],
        "format": s["format"],
        "dtype": s["dtype"],
        "access": s["access"],
        "workers": s["workers"],
        "cache": s["cache"],
        "shuffle": _order_settings(s)["shuffle"],
        "storage": _storage(spec)["label"],
        "mode": s["mode"],
        "batch_size": s["batch_size"],
        "epochs_planned": s["epochs"],
        "repeat": spec["repeat"],
        "seed": spec["seed"],
        "settings": s,
        "store_path": spec["store_path"],
        "store": spec.get("store", {}),
        "started": now(),
        "pid": os.getpid(),
    }


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one spec; returns the finished record (raises on failure)."""
    import torch

    from loadbench.bench.pagecache import evict
    from loadbench.bench.telemetry import Sampler
    from loadbench.training.distributed import setup
    from loadbench.training.loop import resolve_device

    s = spec["settings"]
    record = base_record(spec)
    dist = setup(resolve_device(s["device"]))  # torchrun's process group, when under it
    device = dist.place(resolve_device(s["device"]))
    if s["cache"] == "cold" and dist.local_rank == 0:  # once per machine
        remote = _storage(spec)["url"] != "local"
        record["eviction"] = evict_read_through(spec) if remote else evict(spec["store_path"])
    dist.barrier()  # no rank reads before the eviction
    record["world_size"] = dist.world
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    period = spec["experiment"]["sample_period_s"]
    started = time.perf_counter()
    with Sampler(period, gpu_index=device.index or 0) as sampler:
        if s["mode"] == "train":
            _train(spec, record, sampler, device, started)
        else:
            _loader_only(spec, record, sampler, device, started)
    record["total_time_s"] = time.perf_counter() - started
    if device.type == "cuda":
        record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    record["sampler"] = _sampler_cost(record["epochs"], period)
    record["device"] = str(device)
    record["status"] = "ok"
    record["finished"] = now()
    return record


def _sampler_cost(epochs: list[dict[str, Any]], period: float) -> dict[str, Any]:
    busy = sum(e.get("sampler_busy_s") or 0 for e in epochs)
    wall = sum(e.get("window_s") or 0 for e in epochs)
    return {"period_s": period, "busy_s": busy, "fraction_of_epochs": busy / wall if wall else None}


def _storage(spec: dict[str, Any]) -> dict[str, Any]:
    """The run's storage (older specs have none: local), with its label."""
    from loadbench.bench.experiment import Storage

    storage = Storage.model_validate(spec.get("cell", {}).get("storage") or {})
    return {**storage.model_dump(), "label": storage.label, "options": storage.options()}


def open_run_store(spec: dict[str, Any], device):
    """The run's store: a local directory, or object storage read in place or through the
    storage's read-through cache."""
    from loadbench.store import open_store

    storage = _storage(spec)
    if storage["url"] == "local":
        return open_store(spec["store_path"], device=str(device))
    return open_store(
        spec["store_path"], device=str(device), cache_dir=storage["cache_dir"],
        storage_options=storage["options"],
    )  # fmt: skip


def evict_read_through(spec: dict[str, Any]) -> dict[str, Any]:
    """A cold run on object storage starts with the store's read-through copy deleted (there
    is no page cache of the network to drop)."""
    import shutil

    store = open_run_store(spec, "cpu")
    if not store.files.cached:
        return {"read_through_cleared_bytes": 0}
    root = store.files.cache_root
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names)
    shutil.rmtree(root, ignore_errors=True)
    return {"read_through_cleared_bytes": size}


def _cache_window(store, since: dict[str, int] | None) -> dict[str, Any]:
    """The read-through cache's counts since `since` (empty for stores without one)."""
    stats = store.files.cache_stats(since)
    return {} if stats is None else {"read_through": stats}


def _train(spec, record, sampler, device, started) -> None:
    from loadbench.training.config import TrainConfig
    from loadbench.training.loop import Run
    from loadbench.training.metrics import classification_report

    s = spec["settings"]
    store = open_run_store(spec, device)
    config = TrainConfig(
        data=spec["store_path"], access=s["access"], workers=s["workers"],
        batch_size=s["batch_size"], pin_memory=s["pin_memory"], epochs=s["epochs"],
        seed=spec["seed"], device=s["device"], **_order_settings(s), **s["train"],
    )  # fmt: skip
    record["epochs"] = []
    counts = {"since": store.files.counters.snapshot() if store.files.cached else None}

    def telemetry() -> dict[str, Any]:  # every rank, each epoch: its entry of `ranks` under DDP
        window = _cache_window(store, counts["since"])
        if store.files.cached:
            counts["since"] = store.files.counters.snapshot()
        return {**sampler.window(), **window}

    def on_epoch(epoch_record: dict[str, Any]) -> None:
        record["epochs"].append(epoch_record)

    run = Run(config, store, out_dir=None, callbacks=(on_epoch,), epoch_extras=telemetry)
    record["order_quality"] = _order_quality(store, run.train_order)
    run.maybe_compile()
    record["setup"] = {"time_s": time.perf_counter() - started, **sampler.window()}
    record["plan"] = run.plan.note
    run.fit()
    loss, predicted, targets = run.predict(run.eval_batches)
    run.close()
    report = classification_report(targets, predicted, run.classes)
    record["final"] = {
        "split": run.plan.eval_split, "loss": loss, "accuracy": report["accuracy"],
        "f1_macro": report["f1_macro"], "compile_time_s": run.compile_time_s,
    }  # fmt: skip
    first = record["epochs"][0]["first_batch_s"] if record["epochs"] else math.nan
    record["time_to_first_batch_s"] = record["setup"]["time_s"] + first


def _loader_only(spec, record, sampler, device, started) -> None:
    """Iterate the training loader and move batches to the device, with no model: the ceiling
    of a format and access mode."""
    import torch

    from loadbench.training.data import (
        EpochOrder,
        Shard,
        labels_of,
        make_batches,
        plan_splits,
        shutdown,
    )
    from loadbench.training.distributed import gather_epoch, setup

    dist = setup(device)  # the process group `execute` started, if any
    s = spec["settings"]
    store = open_run_store(spec, device)
    order_settings = _order_settings(s)
    store.chunk_cache_bytes = order_settings["chunk_cache_mb"] << 20
    plan = plan_splits(store, seed=spec["seed"])
    order = EpochOrder(plan.train_indices, labels_of(store, "train")[plan.train_indices],
                       spec["seed"], shuffle=order_settings["shuffle"],
                       block=store.raw("train").block_images,
                       window=order_settings["shuffle_window"])  # fmt: skip
    record["order_quality"] = _order_quality(store, order)
    pin = s["pin_memory"] if s["pin_memory"] is not None else device.type == "cuda"
    batches = make_batches(
        store, "train", order, access=s["access"], batch_size=s["batch_size"],
        workers=s["workers"], pin_memory=pin and s["access"] != "device", device=device,
        augmenter=None, shard=Shard(dist.rank, dist.world) if dist.active else None,
    )  # fmt: skip
    record["setup"] = {"time_s": time.perf_counter() - started, **sampler.window()}
    record["epochs"] = []
    for epoch in range(1, s["epochs"] + 1):
        order.set_epoch(epoch)
        since = store.files.counters.snapshot() if store.files.cached else None
        t0 = time.perf_counter()
        first, images_seen = None, 0
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if first is None:
                first = time.perf_counter() - t0
            images_seen += len(labels)
        elapsed = time.perf_counter() - t0
        mine = {
            "epoch": epoch, "time_s": elapsed, "data_wait_s": elapsed, "compute_s": 0.0,
            "images_per_s": images_seen / elapsed if elapsed else 0.0,
            "first_batch_s": first or 0.0, "images": images_seen,
        }  # fmt: skip
        telemetry = {**sampler.window(), **_cache_window(store, since)}
        record["epochs"].append(gather_epoch(dist, mine, telemetry))  # + `ranks` under DDP
    shutdown(batches)
    first = record["epochs"][0]["first_batch_s"] if record["epochs"] else math.nan
    record["time_to_first_batch_s"] = record["setup"]["time_s"] + first


def _order_quality(store, order) -> dict[str, Any] | None:
    """The epoch order's quality; None for a peer that streams in its library's own order."""
    return None if store.format.own_order else order.quality()


def _order_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The epoch-order keys of a run's settings, with the defaults of runs that omit them."""
    from loadbench.training.config import ORDER_DEFAULTS

    return {key: settings.get(key, default) for key, default in ORDER_DEFAULTS.items()}


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(clean(data), f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean(value: Any) -> Any:
    """Strict JSON: NumPy scalars as numbers, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main(argv: list[str]) -> int:
    """Under torchrun every rank runs this; rank 0 alone writes RESULT, and another rank that
    fails says so on stderr (torchrun's log, which the runner reads)."""
    from loadbench.training.distributed import is_main_process, under_torchrun

    spec_path, result_path = argv
    if under_torchrun():
        from loadbench.bench.zygote import die_with_parent

        die_with_parent()  # a rank does not go on computing alone when torchrun is killed
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        record = execute(spec)
    except BaseException as e:  # the runner records the failure; the experiment goes on
        from loadbench.errors import LoadbenchError

        error = f"{type(e).__name__}: {e}" if not isinstance(e, LoadbenchError) else str(e)
        if not is_main_process():
            traceback.print_exc()
            print(f"{RANK_FAILED} {os.environ['RANK']}: {error}", file=sys.stderr, flush=True)
            return 1
        record = base_record(spec)
        record.update({
            "status": "failed",
            "error": error,
            "traceback": traceback.format_exc()[-4000:],
            "finished": now(),
        })  # fmt: skip
        write_json_atomic(result_path, record)
        return 1
    if is_main_process():
        write_json_atomic(result_path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
