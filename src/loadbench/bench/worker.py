"""One benchmark run, in a process of its own: `python -m loadbench.bench.worker SPEC RESULT`.

A fresh process per run means no page-cache mappings, allocator state, compiled kernels or open
handles carry over from one run to the next. SPEC is a `RunSpec` as JSON; the `RunRecord` is
written atomically to RESULT. A failure is written as a failed record with the error, and a
process that is killed writes nothing (the runner records that).

A run reads the store the runner converted, or fails: `check_store` compares the store's
manifest with the one the runner saw when the run opens it, after every epoch and at its end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Any

from loadbench.bench.matrix import RunSpec
from loadbench.bench.records import RunRecord
from loadbench.bench.torchrun import RANK_FAILED
from loadbench.errors import LoadbenchError
from loadbench.formats import get_format
from loadbench.stages import StageWindow
from loadbench.util import cpu_budget, die_with_parent, now_iso, write_json_atomic


def execute(spec: RunSpec) -> RunRecord:
    """Run one spec; returns the finished record (raises on failure)."""
    import torch

    from loadbench.bench.pagecache import evict
    from loadbench.bench.telemetry import Sampler
    from loadbench.training.distributed import setup
    from loadbench.training.loop import resolve_device

    e = spec.experiment
    record = spec.record()
    dist = setup(resolve_device(e.device))  # torchrun's process group, when under it
    device = dist.place(resolve_device(e.device))
    if spec.cell.cache == "cold" and dist.local_rank == 0:  # once per machine
        remote = not spec.cell.storage.local
        record.eviction = evict_read_through(spec) if remote else evict(spec.store_path)
    dist.barrier()  # no rank reads before the eviction
    record.world_size = dist.world
    record.cpu_budget = cpu_budget(spec.cell.workers)
    record.peer = get_format(spec.cell.format).peer
    record.epoch_order = "own" if get_format(spec.cell.format).own_order else "exact"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with Sampler(e.sample_period_s, gpu_index=device.index or 0) as sampler:
        if spec.mode == "train":
            _train(spec, record, sampler, device, started)
        elif spec.mode == "compute-only":
            _compute_only(spec, record, sampler, device, started)
        else:
            _loader_only(spec, record, sampler, device, started)
    record.total_time_s = time.perf_counter() - started
    if device.type == "cuda":
        record.cuda_max_allocated_bytes = torch.cuda.max_memory_allocated(device)
    record.sampler = _sampler_cost(record.epochs, e.sample_period_s)
    record.device = record.device or str(device)  # a keras run says where TensorFlow ran
    record.status = "ok"
    record.finished = now_iso()
    return record


def _sampler_cost(epochs: list[dict[str, Any]], period: float) -> dict[str, Any]:
    busy = sum(e.get("sampler_busy_s") or 0 for e in epochs)
    wall = sum(e.get("window_s") or 0 for e in epochs)
    return {"period_s": period, "busy_s": busy, "fraction_of_epochs": busy / wall if wall else None}


def open_run_store(spec: RunSpec, device):
    """The run's store: a local directory, or object storage read in place or through the
    storage's read-through cache."""
    from loadbench.store import open_store

    storage = spec.cell.storage
    if storage.local:
        return open_store(spec.store_path, device=str(device))
    return open_store(
        spec.store_path, device=str(device), cache_dir=storage.cache_dir,
        storage_options=storage.options(),
    )  # fmt: skip


def check_store(store, spec: RunSpec) -> None:
    """Fail the run when its store was deleted or replaced (by a conversion with --overwrite, a
    clean-up) since the runner converted it. Reads may go on without an error meanwhile: from
    files opened before, or as blank images where zarr finds a chunk missing; only the manifest
    (its identity and creation time) tells. Checked outside the timed epochs."""
    from loadbench.manifest import MANIFEST

    try:
        manifest = json.loads(store.files.read_direct(MANIFEST))
    except (OSError, ValueError, LoadbenchError) as e:
        raise LoadbenchError(
            f"the store {store.path} was deleted or damaged during the run ({e}); the run does "
            "not count: run `loadbench bench` again"
        ) from None
    expected = spec.store.get("created")
    same = (manifest.get("identity"), manifest.get("created")) == (
        spec.store.get("identity"), expected)  # fmt: skip
    if expected is not None and not same:
        raise LoadbenchError(
            f"the store {store.path} was replaced during the run (converted {expected}, now "
            f"{manifest.get('created')}); the run does not count: run `loadbench bench` again"
        )


def evict_read_through(spec: RunSpec) -> dict[str, Any]:
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


def _train_config(spec: RunSpec):
    """The training configuration of a train or compute-only run."""
    from loadbench.training.config import TrainConfig

    e, cell = spec.experiment, spec.cell
    # The cell's graph mode decides: torch.compile is `graph: compiled` (and `train.compile`,
    # from before, is that too).
    train = {**e.train, "compile": cell.framework == "torch" and cell.graph == "compiled"}
    return TrainConfig(
        data=spec.store_path, access=cell.access, workers=cell.workers,
        batch_size=e.batch_size, pin_memory=e.pin_memory, epochs=e.epochs, seed=spec.seed,
        device=e.device, shuffle=cell.shuffle, shuffle_window=e.shuffle_window,
        chunk_cache_mb=e.chunk_cache_mb, framework=cell.framework, graph=cell.graph, **train,
    )  # fmt: skip


def _training_run(spec: RunSpec, config, store, **hooks):
    """The run that trains: torch's `Run`, or Keras' `KerasRun` (the same methods)."""
    if spec.cell.framework == "keras":
        from loadbench.frameworks.keras_run import KerasRun

        return KerasRun(config, store, graph=spec.cell.graph, **hooks)
    from loadbench.training.loop import Run

    return Run(config, store, out_dir=None, **hooks)


def _train(spec: RunSpec, record: RunRecord, sampler, device, started: float) -> None:
    from loadbench.training.metrics import classification_report

    store = open_run_store(spec, device)
    check_store(store, spec)
    config = _train_config(spec)
    record.epochs = []
    counts = {"since": store.files.counters.snapshot() if store.files.cached else None}

    def telemetry() -> dict[str, Any]:  # every rank, each epoch: its entry of `ranks` under DDP
        window = _cache_window(store, counts["since"])
        if store.files.cached:
            counts["since"] = store.files.counters.snapshot()
        return {**sampler.window(), **window, **loader_stages.window()}

    def checked(entry: dict[str, Any]) -> None:
        record.epochs.append(entry)
        check_store(store, spec)

    run = _training_run(spec, config, store, callbacks=(checked,), epoch_extras=telemetry)
    record.order_quality = _order_quality(store, run.train_order)
    run.maybe_compile()
    loader_stages = StageWindow(run.train_batches)  # counted from the first epoch on
    record.setup = {"time_s": time.perf_counter() - started, **sampler.window()}
    record.plan = run.plan.note
    run.fit()
    loss, predicted, targets = run.predict(run.eval_batches)
    run.close()
    check_store(store, spec)
    report = classification_report(targets, predicted, run.classes)
    record.final = {
        "split": run.plan.eval_split, "loss": loss, "accuracy": report["accuracy"],
        "f1_macro": report["f1_macro"], "compile_time_s": run.compile_time_s,
    }  # fmt: skip
    record.final["classes"] = len(run.classes)  # the report's chance level: 1 / classes
    if spec.cell.framework == "keras":
        record.device = run.device
    record.time_to_first_batch_s = _time_to_first_batch(record)


def _compute_only(spec: RunSpec, record: RunRecord, sampler, device, started: float) -> None:
    """Train the run's model on one batch that stays on the device, as many steps per epoch as
    a train run takes: the epoch time if data were free (the compute ceiling)."""
    import math

    from loadbench.training.batches import FixedBatches
    from loadbench.training.distributed import gather_epoch
    from loadbench.training.loop import Run

    store = open_run_store(spec, device)
    check_store(store, spec)
    run = Run(_train_config(spec), store, out_dir=None)
    run.train_order.set_epoch(1)
    images, labels = run._to_device(*next(iter(run.train_batches)))
    per_rank = math.ceil(len(run.train_order) / run.dist.world)
    steps = len(run.train_batches)
    fixed = FixedBatches(images, labels, steps, per_rank - (steps - 1) * len(labels))
    run.close()
    run.maybe_compile()
    record.setup = {"time_s": time.perf_counter() - started, **sampler.window()}
    record.epochs = []
    for epoch in range(1, spec.experiment.epochs + 1):
        mine = {"epoch": epoch, **run.train_epoch(epoch, batches=fixed)}
        record.epochs.append(gather_epoch(run.dist, mine, sampler.window()))
    record.time_to_first_batch_s = _time_to_first_batch(record)


def _time_to_first_batch(record: RunRecord) -> float:
    first = record.epochs[0]["first_batch_s"] if record.epochs else math.nan
    return record.setup["time_s"] + first


def _loader_only(spec: RunSpec, record: RunRecord, sampler, device, started: float) -> None:
    """Iterate the training loader and move batches to the device, with no model: the ceiling
    of a format and access mode."""
    from loadbench.training.batches import make_batches, shutdown
    from loadbench.training.distributed import setup
    from loadbench.training.order import EpochOrder
    from loadbench.training.sharding import Shard
    from loadbench.training.splits import labels_of, plan_splits

    dist = setup(device)  # the process group `execute` started, if any
    e, cell = spec.experiment, spec.cell
    store = open_run_store(spec, device)
    check_store(store, spec)
    store.chunk_cache_bytes = e.chunk_cache_mb << 20
    plan = plan_splits(store, seed=spec.seed)
    order = EpochOrder(plan.train_indices, labels_of(store, "train")[plan.train_indices],
                       spec.seed, shuffle=cell.shuffle, block=store.raw("train").block_images,
                       window=e.shuffle_window)  # fmt: skip
    record.order_quality = _order_quality(store, order)
    pin = e.pin_memory if e.pin_memory is not None else device.type == "cuda"
    batches = make_batches(
        store, "train", order, access=cell.access, batch_size=e.batch_size,
        workers=cell.workers, pin_memory=pin and cell.access != "device", device=device,
        augmenter=None, shard=Shard(dist.rank, dist.world) if dist.active else None,
    )  # fmt: skip
    record.setup = {"time_s": time.perf_counter() - started, **sampler.window()}
    record.epochs = []
    for epoch in range(1, e.epochs + 1):
        record.epochs.append(_loader_epoch(epoch, order, batches, store, sampler, device, dist))
        check_store(store, spec)
    shutdown(batches)
    record.time_to_first_batch_s = _time_to_first_batch(record)


def _loader_epoch(epoch: int, order, batches, store, sampler, device, dist) -> dict[str, Any]:
    """One loader-only epoch: every batch moved to the device, timed as a whole."""
    import torch

    from loadbench.training.distributed import gather_epoch

    order.set_epoch(epoch)
    since = store.files.counters.snapshot() if store.files.cached else None
    loader_stages = StageWindow(batches)
    t0 = time.perf_counter()
    first, images_seen = None, 0
    for images, labels in batches:
        copying = time.perf_counter_ns()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        loader_stages.copied(time.perf_counter_ns() - copying)
        if first is None:
            first = time.perf_counter() - t0
        images_seen += len(labels)
    elapsed = time.perf_counter() - t0
    mine = {
        "epoch": epoch, "time_s": elapsed, "data_wait_s": elapsed, "compute_s": 0.0,
        "images_per_s": images_seen / elapsed if elapsed else 0.0,
        "first_batch_s": first or 0.0, "images": images_seen,
    }  # fmt: skip
    telemetry = {**sampler.window(), **_cache_window(store, since), **loader_stages.window()}
    return gather_epoch(dist, mine, telemetry)  # + `ranks` under DDP


def _order_quality(store, order) -> dict[str, Any] | None:
    """The epoch order's quality; None for a peer that streams in its library's own order."""
    return None if store.format.own_order else order.quality()


def main(argv: list[str]) -> int:
    """Under torchrun every rank runs this; rank 0 alone writes RESULT, and another rank that
    fails says so on stderr (torchrun's log, which the runner reads)."""
    from loadbench.training.distributed import is_main_process, under_torchrun

    spec_path, result_path = argv
    if under_torchrun():
        die_with_parent()  # a rank does not go on computing alone when torchrun is killed
    with open(spec_path, encoding="utf-8") as f:
        spec = RunSpec.model_validate_json(f.read())
    try:
        record = execute(spec)
    except BaseException as e:  # the runner records the failure; the experiment goes on
        error = f"{type(e).__name__}: {e}" if not isinstance(e, LoadbenchError) else str(e)
        if not is_main_process():
            traceback.print_exc()
            print(f"{RANK_FAILED} {os.environ['RANK']}: {error}", file=sys.stderr, flush=True)
            return 1
        record = spec.record().fail(error, traceback=traceback.format_exc()[-4000:])
        write_json_atomic(result_path, record.to_json(), fsync=True)
        return 1
    if is_main_process():
        write_json_atomic(result_path, record.to_json(), fsync=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
