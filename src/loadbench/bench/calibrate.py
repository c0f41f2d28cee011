"""The calibration behind `estimate.py`: seconds of measurement on this machine that price the
runs no earlier run prices.

Per (dataset, format, dtype, access): a few batches read from the store when --stores has it,
else from a small sample of the source converted into a temporary directory (its conversion, per
image, also prices the real one). Per dataset: a few training steps of the experiment's model on
a device-resident batch of the dataset's shape (compute only, as a compute-only run measures
it). Each is the median of a few: the machine as busy as it is now, a burst left out.
A run is then its start, the channel statistics, `epochs` x (training + evaluation), and the
final evaluation (`run_seconds`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from loadbench.bench.experiment import Dataset, Experiment
from loadbench.bench.matrix import Cell
from loadbench.errors import LoadbenchError

# A run's own cost besides its epochs: the fork of the template, opening the store and the
# record (loader-only runs of small stores take 0.06-0.3 s here), and with a model, building it
# and its first step's one-time set-up (0.1-0.2 s more for small models).
RUN_START_S = 0.1
MODEL_START_S = 0.2
# The template process imports torch and the rest once per bench: the calibration measures it;
# without one, this (2-3 s on 2 idle cores, 5 s on busy ones). Python's own start, 0.3 s.
TEMPLATE_START_S = 3.0
PYTHON_START_S = 0.3
# Pixel values (images x H x W x C) per calibration batch, at most: 2 MB of uint8, a full batch
# of small images, a few of 512x512 ones (per-image costs are measured, then multiplied).
BATCH_VALUES = 2**21
TIMED_BATCHES = 3  # at least, after one untimed batch; the median counts


@dataclass
class Size:
    """A dataset's images per split and the values of one image (H x W x C)."""

    counts: dict[str, int]
    values: int

    @property
    def train(self) -> int:
        return self.counts.get("train", 0)

    @property
    def evaluated(self) -> int:
        """The split each epoch evaluates: val, else test (else a slice of train, left out)."""
        return self.counts.get("val", self.counts.get("test", 0))

    @property
    def images(self) -> int:
        return sum(self.counts.values())


def dataset_id(dataset: dict[str, Any] | Dataset) -> str:
    """A dataset as an experiment gives it (a record's `settings.dataset`), as one string."""
    data = dataset.model_dump() if isinstance(dataset, Dataset) else dataset
    return json.dumps(data, sort_keys=True, default=str)


class Calibration:
    """Seconds of measurement on this machine, for the cells no earlier run prices."""

    def __init__(self, experiment: Experiment, stores_dir: str):
        self.experiment, self.stores_dir = experiment, stores_dir
        self.sources: dict[str, Any] = {}  # dataset id -> the source, or why it cannot load
        self.reads: dict[tuple, float | str] = {}  # (dataset, format, dtype, access) -> s/image
        self.stats: dict[tuple, float] = {}  # (dataset, format, dtype) -> s/image
        self.samples: dict[str, Any] = {}  # dataset id -> a few batches of it, in memory
        self.stores: dict[tuple, Any] = {}  # (dataset, format, dtype) -> the store read
        self.converts: dict[tuple, float] = {}  # (dataset, format, dtype) -> s, 0 if it exists
        self.steps: dict[str, tuple[float, float] | str] = {}  # dataset -> train, eval s/image
        self.start_s = _template_start_s()
        self.scratch = tempfile.TemporaryDirectory(prefix="loadbench-calibrate-")

    def price(self, cell: Cell) -> tuple[float | None, str]:
        """Seconds per run of `cell`, or None and why it cannot be calibrated."""
        if not cell.storage.local:
            return None, "runs on object storage are priced from earlier runs only"
        source = self._source(cell.dataset)
        if isinstance(source, str):
            return None, f"{cell.dataset.label}: {source}"
        read = self._read(cell, source)
        if isinstance(read, str):
            return None, f"{cell.dataset.label} {cell.format}/{cell.dtype}: {read}"
        steps = self._steps(cell.dataset, source)
        if isinstance(steps, str):
            return None, f"{cell.dataset.label}: the model's step: {steps}"
        mode = cell.mode or self.experiment.mode
        stats = self.stats[_store_key(cell)]
        return run_seconds(
            self.experiment, cell, mode, _source_size(source), read, steps, stats
        ), ""

    def convert_s(self) -> float:
        return sum(self.converts.values())

    def close(self) -> None:
        """Close the stores read, and remove the samples converted."""
        for store in self.stores.values():
            store.close()
        self.scratch.cleanup()

    def _source(self, dataset: Dataset):
        """The whole source (its size, and its stores' place in --stores), or why not."""
        from loadbench.sources import load_source

        key = dataset_id(dataset)
        if key not in self.sources:
            options = {**dataset.options, **({"limit": dataset.limit} if dataset.limit else {})}
            try:
                self.sources[key] = load_source(dataset.source, **options)
            except LoadbenchError as e:
                self.sources[key] = str(e)
            except OSError as e:
                self.sources[key] = f"{type(e).__name__}: {e}"
        return self.sources[key]

    def _read(self, cell: Cell, source) -> float | str:
        """Seconds per image to load `cell`'s store with its access mode (`device`: once per
        run, as the format's batch access reads it), or why it cannot be measured."""
        from loadbench.formats import get_format

        access = cell.access
        if access == "device":
            accesses = get_format(cell.format).accesses
            access = "batch" if "batch" in accesses else "sample"
        key = (*_store_key(cell), access)
        if key not in self.reads:
            try:
                store = self._store(cell, source)
                self.reads[key] = _time_reads(store, access, self.experiment.batch_size)
            except (LoadbenchError, OSError) as e:
                self.reads[key] = str(e)
        return self.reads[key]

    def _store(self, cell: Cell, source):
        """The cell's store from --stores, or a small sample of its source converted into
        a scratch directory (timed: it prices the whole conversion)."""
        from loadbench.bench.runner import store_dir_for
        from loadbench.conversion import convert
        from loadbench.manifest import MANIFEST
        from loadbench.store import open_store

        key = _store_key(cell)
        if key in self.stores:
            return self.stores[key]
        options = self.experiment.format_options.get(cell.format, {})
        path = store_dir_for(self.stores_dir, cell, source, options)
        if os.path.isfile(os.path.join(path, MANIFEST)):
            store = open_store(path)
            self.converts[key] = 0.0
        else:
            sample = self._sample(cell.dataset, source)
            out = os.path.join(self.scratch.name, str(len(self.stores)))
            began = time.perf_counter()
            store = convert(sample, cell.format, out, cell.dtype, **options)
            per_image = (time.perf_counter() - began) / _source_size(sample).images
            self.converts[key] = per_image * _source_size(source).images
        self.stats[key] = _time_stats(store)
        self.stores[key] = store
        return store

    def _sample(self, dataset: Dataset, source):
        """A few batches' worth of the source's images per split, in memory (one per
        dataset: drawing or decoding them can cost more than converting them)."""
        from loadbench.sources import load_source

        key = dataset_id(dataset)
        if key not in self.samples:
            batch = _batch(self.experiment.batch_size, source.image_shape)
            limit = min(batch * (TIMED_BATCHES + 1), dataset.limit or batch * (TIMED_BATCHES + 1))
            options = {**dataset.options, "limit": limit}
            self.samples[key] = load_source(dataset.source, **options).in_memory()
        return self.samples[key]

    def _steps(self, dataset: Dataset, source) -> tuple[float, float] | str:
        key = dataset_id(dataset)
        if key not in self.steps:
            try:
                self.steps[key] = time_steps(self.experiment, source)
            except (LoadbenchError, RuntimeError) as e:
                self.steps[key] = str(e)
        return self.steps[key]


def _template_start_s() -> float:
    """Seconds for the template process to start: its imports, timed here when this process
    has not imported them yet (the calibration needs them anyway), else in a Python of its
    own."""
    from loadbench.bench import zygote

    began = time.perf_counter()
    if "torch" in sys.modules:
        code = "from loadbench.bench.zygote import preload; preload()"
        subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
        return time.perf_counter() - began
    zygote.preload()
    return time.perf_counter() - began + PYTHON_START_S


def _store_key(cell: Cell) -> tuple:
    return (dataset_id(cell.dataset), cell.format, cell.dtype)


def _source_size(source) -> Size:
    return Size({s: source.count(s) for s in source.splits}, math.prod(source.image_shape))


def _batch(batch_size: int, image_shape) -> int:
    """The images of a calibration batch: the experiment's batch, or fewer big images."""
    return max(1, min(batch_size, BATCH_VALUES // math.prod(image_shape)))


def _time_stats(store) -> float:
    """Seconds per image of the channel statistics a run takes over its training images (the
    reader opened first)."""
    import numpy as np

    from loadbench.training.splits import channel_stats

    count = len(store.raw("train").labels())
    indices = np.arange(max(1, min(count, BATCH_VALUES // math.prod(store.image_shape))))
    channel_stats(store, "train", indices[:1])
    return _typical(lambda: channel_stats(store, "train", indices)) / len(indices)


def _time_reads(store, access: str, batch_size: int) -> float:
    """Seconds per image to load a training batch of `store` with `access` and no workers: the
    median of a few, after the first (which opens files and fills caches)."""
    import numpy as np
    import torch

    from loadbench.training.batches import make_batches, shutdown
    from loadbench.training.order import EpochOrder
    from loadbench.training.splits import labels_of

    labels = labels_of(store, "train")
    batch = _batch(batch_size, store.image_shape)
    count = min(len(labels), batch * (TIMED_BATCHES + 1))
    order = EpochOrder(np.arange(count), labels[:count], seed=0)
    batches = make_batches(store, "train", order, access=access, batch_size=batch, workers=0,
                           pin_memory=False, device=torch.device("cpu"),
                           augmenter=None)  # fmt: skip
    order.set_epoch(1)
    times, began = [], time.perf_counter()
    for images, _ in batches:
        times.append((time.perf_counter() - began) / len(images))
        began = time.perf_counter()
    shutdown(batches)
    return statistics.median(times[1:] or times)


def time_steps(experiment: Experiment, source) -> tuple[float, float]:
    """Seconds per image of a training step and of an evaluation step of the experiment's
    model, at a run's batch size, on batches of `source`'s shape resident on the device (as
    compute-only runs do): the median of a few, after one untimed step. Batches too big to time
    in a moment (big images) are timed at half and all of `BATCH_VALUES`, and the run's batch
    extrapolated: a step costs a part of its own plus a part per image."""
    import numpy as np

    from loadbench.sources import from_arrays
    from loadbench.store import MemoryStore
    from loadbench.training.batches import FixedBatches
    from loadbench.training.config import TrainConfig
    from loadbench.training.loop import Run

    e = experiment
    wanted = max(1, min(e.batch_size, source.count("train") or e.batch_size))
    batch = _batch(wanted, source.image_shape)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *source.image_shape), dtype=np.uint8)
    labels = np.arange(batch) % max(1, len(source.classes))
    arrays = from_arrays({"train": (images, labels), "test": (images, labels)},
                         classes=list(source.classes))  # fmt: skip
    config = TrainConfig(data="-", access="batch", workers=0, batch_size=batch, epochs=1,
                         seed=e.seed, device=e.device, **e.train)  # fmt: skip
    run = Run(config, MemoryStore(arrays), out_dir=None)
    try:
        run.train_order.set_epoch(1)
        x, y = run._to_device(*next(iter(run.train_batches)))
        run.train_epoch(1, batches=FixedBatches(x, y, 1, len(y)))  # one-time set-up, untimed
        timed = {}
        for n in sorted({batch, max(1, batch // 2)} if batch < wanted else {batch}):
            fixed = FixedBatches(x[:n], y[:n], 1, n)
            timed[n] = (_typical(lambda: run.train_epoch(2, batches=fixed)),  # noqa: B023
                        _typical(lambda: run.predict(fixed)))  # noqa: B023  # fmt: skip
    finally:
        run.close()
    return _per_image(timed, 0, wanted), _per_image(timed, 1, wanted)


def _per_image(timed: dict[int, tuple[float, float]], which: int, batch: int) -> float:
    """Seconds per image at `batch` images a step, from steps timed at one or two sizes."""
    if len(timed) == 1:
        ((n, times),) = timed.items()
        return times[which] / n
    (n1, t1), (n2, t2) = sorted(timed.items())
    per_image = max(0.0, (t2[which] - t1[which]) / (n2 - n1))
    own = max(0.0, t1[which] - per_image * n1)
    return (own + per_image * batch) / batch if per_image else t2[which] / n2


def _typical(step, budget_s: float = 0.2, most: int = 7) -> float:
    """The median time of `TIMED_BATCHES` or more calls of `step` (as many as fit in
    `budget_s`, up to `most`). The median, not the best: a machine shared with other jobs
    runs the experiment as busy as it is now (on 2 cores a busy neighbour slows torch's steps
    several-fold), and a single burst is still left out."""
    times: list[float] = []
    while len(times) < TIMED_BATCHES or (sum(times) < budget_s and len(times) < most):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_seconds(experiment: Experiment, cell: Cell, mode: str, size: Size, read_s: float,
                steps: tuple[float, float], stats_s: float) -> float:  # fmt: skip
    """One run's wall time from per-image costs: its start, the channel statistics, `epochs`
    x (training + evaluation), and the final evaluation. Workers divide the loading; on a GPU
    it overlaps the model's steps, on the CPU both share the cores."""
    train_s, eval_s = steps
    setup = 0.0
    if cell.access == "device":  # the splits are loaded once; batches are then free
        setup, read_s = read_s * (size.train + size.evaluated), 0.0
    load = read_s / min(cell.workers, os.cpu_count() or 1) if cell.workers else read_s
    gpu = experiment.device.startswith("cuda") or (experiment.device == "auto" and _cuda())
    step = max(train_s, load) if gpu and cell.workers else train_s + load
    forward = max(eval_s, load) if gpu and cell.workers else eval_s + load
    if mode == "loader-only":
        return RUN_START_S + setup + experiment.epochs * size.train * load
    stats = MODEL_START_S + size.train * stats_s
    if mode == "compute-only":
        return RUN_START_S + setup + stats + experiment.epochs * size.train * train_s
    epoch = size.train * step + size.evaluated * forward
    return RUN_START_S + setup + stats + experiment.epochs * epoch + size.evaluated * forward


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
