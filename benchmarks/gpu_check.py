"""The CUDA paths on a GPU machine, measured in one run, and whether each check passed.

On a synthetic cifar-like source (20,000 32x32 images by default) converted to an npy and a
tensor store, it measures:

- loader-only images/s (median of the epochs after the first, batch 256) of each store with batch
  access (no workers, and 4 workers through the pinned ring) and device access, on cuda and on
  the CPU, batches moved to the device as the training loop moves them;
- a training epoch of a small cnn-blocks model on cuda: device access with and without AMP, and
  batch access with 4 workers and pinned memory under AMP, with the GPU's utilisation;
- the default experiment's formats on cuda (a `loadbench bench` with `ceilings: true`): per
  format the loader-only images/s, and the train run's images/s, accelerator utilisation (AU),
  data stall and bound (data- or compute-bound, against the compute-only ceiling);
- the tensor format's host-to-device rate: a whole .npy read onto the GPU as the format reads it
  (CuPy + DLPack when CuPy is there), against np.load + a copy from pageable and from pinned
  memory, and a copy of memory already pinned (the ceiling).

Checks (the GPU gives the CPU's batches, pinned batches are pinned, the tensor format shares
CuPy's memory, losses are finite, the model is on the GPU, the telemetry reads the GPU) decide
the exit status; targets (ratios the design expects) are reported met or MISSED without changing
it. Every number comes from this run: compare within it. Without CUDA it says so in one line and
exits 0. Sized for about 3 minutes on an H200 (not yet timed there); scripts/device.sh
runs it on the lent GPU machine.

    python benchmarks/gpu_check.py [--count 20000] [--epochs 4] [--h2d-mib 1024]
        [--bench-count 5000] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np
import torch

import loadbench
from loadbench import progress
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder

GPU = "cuda"
BATCH = 256
WORKERS = 4
LOADERS = [("batch", 0), ("batch", WORKERS), ("device", 0)]  # (access, workers)
MODEL = {"model": "cnn-blocks", "widths": "32,64,128", "batch_norm": True}


class Results:
    """Every number measured, every check and target, in the order they were made."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        print(f"  {'PASS' if passed else 'FAIL'}  {name}{': ' + detail if detail else ''}")

    def target(self, name: str, value: float, limit: float, at_most: bool = False) -> None:
        met = value <= limit if at_most else value >= limit  # NaN: not met
        self.targets.append({"name": name, "value": value, "limit": limit, "at_most": at_most,
                             "met": met})  # fmt: skip
        print(f"  {'met' if met else 'MISSED'}  {name}: {value:.3g} (target "
              f"{'<=' if at_most else '>='} {limit:g})")  # fmt: skip

    def section(self, title: str, run, *args) -> Any:
        """Run one part; an exception fails that part's check and the next part still runs."""
        print(f"\n{title}", flush=True)
        try:
            return run(self, *args)
        except Exception as e:
            traceback.print_exc()
            self.check(f"{title} ran", False, f"{type(e).__name__}: {e}")
            return None


def on_cuda() -> bool:
    return torch.device(GPU).type == "cuda"


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def allocated() -> int:
    """Bytes torch's CUDA allocator holds for tensors now."""
    return torch.cuda.memory_allocated() if on_cuda() else 0


def header() -> dict[str, Any]:
    from loadbench.bench.env import gpu_info

    props = torch.cuda.get_device_properties(0)
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:  # not installed, or not for this driver
        cupy_version = None
    gpus = gpu_info()
    info = {
        "device": props.name, "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}", "devices": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cupy": cupy_version,
        "driver": gpus[0]["driver"] if gpus else None, "cpus": os.cpu_count(),
        "loadbench": loadbench.__version__,
    }  # fmt: skip
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"device: {info['device']}, {info['memory_gib']:.0f} GiB, compute capability "
        f"{info['capability']} ({info['devices']} device(s)), driver {info['driver']}"
    )
    print(f"torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), CuPy "
          f"{cupy_version or 'not installed'}, loadbench {info['loadbench']}, "
          f"{info['cpus']} CPUs")  # fmt: skip
    print(f"command: python {' '.join(sys.argv)}")
    return info


def make_stores(results: Results, tmp: str, count: int) -> dict[str, str]:
    spec = f"synthetic:cifar-like?count={count}&eval_count={max(500, count // 20)}"
    started = time.perf_counter()
    source = loadbench.load_source(spec)
    stores = {fmt: loadbench.convert(source, fmt, os.path.join(tmp, fmt)).path
              for fmt in ("npy", "tensor")}  # fmt: skip
    print(f"  {spec}: npy and tensor stores in {time.perf_counter() - started:.1f} s")
    results.data["source"] = spec
    return stores


def train_labels(path: str) -> np.ndarray:
    return loadbench.open_store(path, device="cpu").raw("train").labels()


def open_batches(path: str, access: str, workers: int, device: str):
    """The training loader of a store on `device` (pinned memory on the GPU, as a run uses)."""
    labels = train_labels(path)
    order = EpochOrder(np.arange(len(labels)), labels, seed=0)
    pin = torch.device(device).type == "cuda" and access != "device"
    store = loadbench.open_store(path, device=device)
    batches = make_batches(
        store, "train", order, access=access, batch_size=BATCH, workers=workers,
        pin_memory=pin, device=torch.device(device), augmenter=None,
    )  # fmt: skip
    return batches, order


def loader_rate(path: str, access: str, workers: int, device: str, epochs: int) -> float:
    """Images/s of loader-only epochs (every batch moved to `device`), median after the first."""
    batches, order = open_batches(path, access, workers, device)
    rates = []
    try:
        for epoch in range(1, epochs + 1):
            order.set_epoch(epoch)
            sync()
            started, seen = time.perf_counter(), 0
            for images, labels in batches:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                seen += len(labels)
            sync()
            rates.append(seen / (time.perf_counter() - started))
    finally:
        shutdown(batches)
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def first_batches(path: str, access: str, workers: int, device: str, count: int = 8):
    batches, order = open_batches(path, access, workers, device)
    order.set_epoch(1)
    got = []
    try:
        for images, labels in batches:
            got.append((images, labels))
            if len(got) == count:
                break
    finally:
        shutdown(batches)
    return got


def loaders(results: Results, stores: dict[str, str], epochs: int) -> None:
    rates: dict[str, float] = {}
    print(f"  loader only, images/s (median of epochs 2-{epochs}), batch {BATCH}:")
    print(f"  {'store':8s} {'access':10s} {'cpu':>12s} {'cuda':>12s} {'cuda/cpu':>9s}")
    for fmt, path in stores.items():
        for access, workers in LOADERS:
            row = {dev: loader_rate(path, access, workers, dev, epochs) for dev in ("cpu", GPU)}
            for dev, value in row.items():
                rates[f"{fmt}/{access}/w{workers}/{'cpu' if dev == 'cpu' else 'cuda'}"] = value
            print(f"  {fmt:8s} {f'{access} w{workers}':10s} {row['cpu']:12,.0f} "
                  f"{row[GPU]:12,.0f} {row[GPU] / row['cpu']:8.2f}x", flush=True)  # fmt: skip
    results.data["loader_images_per_s"] = rates

    print("  the GPU's batches against the CPU's (first 8 batches of epoch 1):")
    for fmt, path in stores.items():
        for access, workers in LOADERS:
            on_gpu = first_batches(path, access, workers, GPU)
            on_cpu = first_batches(path, access, workers, "cpu")
            where = "on the GPU" if access == "device" else "pinned"
            placed = all((x.device.type == torch.device(GPU).type and y.device == x.device)
                         if access == "device" else (x.is_pinned() and y.is_pinned())
                         for x, y in on_gpu)  # fmt: skip
            worst = max(float((x.to("cpu") - cx).abs().max()) for (x, _), (cx, _) in
                        zip(on_gpu, on_cpu, strict=True))  # fmt: skip
            same_labels = all(torch.equal(y.to("cpu"), cy) for (_, y), (_, cy) in
                              zip(on_gpu, on_cpu, strict=True))  # fmt: skip
            results.check(f"{fmt} {access} w{workers}: batches {where}, equal to the CPU's",
                          placed and worst <= 1e-6 and same_labels and len(on_gpu) == 8,
                          f"max |difference| {worst:.1e}, labels equal: {same_labels}")  # fmt: skip

    def rate(key: str) -> float:
        return rates.get(key, math.nan)

    results.target("npy device access: cuda / cpu images/s",
                   rate("npy/device/w0/cuda") / rate("npy/device/w0/cpu"), 2.0)  # fmt: skip
    results.target("on cuda: device access / batch access (npy, no workers)",
                   rate("npy/device/w0/cuda") / rate("npy/batch/w0/cuda"), 1.0)  # fmt: skip
    results.target("on cuda: tensor device access / npy device access",
                   rate("tensor/device/w0/cuda") / rate("npy/device/w0/cuda"), 0.8)  # fmt: skip


def tensor_reads(results: Results, stores: dict[str, str]) -> None:
    path = stores["tensor"]
    count = len(train_labels(path))
    indices = np.random.default_rng(1).permutation(count)[:BATCH]
    sync()
    started = time.perf_counter()
    on_gpu = loadbench.open_store(path, device=GPU).new_reader("train")
    handle = on_gpu.handle
    sync()
    loaded = time.perf_counter() - started
    on_cpu = loadbench.open_store(path, device="cpu").new_reader("train")
    images, labels = on_gpu.read_batch_tensor(indices)
    expected, expected_labels = on_cpu.read_batch_tensor(indices)
    worst = float((images.to("cpu") - expected).abs().max())
    results.check(
        "tensor format: the split resident on the GPU, read_batch_tensor equal to the CPU's",
        handle["device"].type == torch.device(GPU).type and images.device == handle["device"]
        and worst <= 1e-6 and torch.equal(labels.to("cpu"), expected_labels),
        f"{handle['images'].nbytes / 2**20:.0f} MiB loaded in {loaded * 1e3:.0f} ms, "
        f"max |difference| {worst:.1e}",
    )  # fmt: skip
    results.data["tensor_split_load_s"] = loaded


def training(results: Results, stores: dict[str, str], tmp: str) -> None:
    from loadbench.bench.telemetry import Sampler
    from loadbench.training.config import TrainConfig
    from loadbench.training.train import train

    runs = {"device access, fp32": ("device", 0, False),
            "device access, AMP": ("device", 0, True),
            f"batch access, {WORKERS} workers, pinned, AMP": ("batch", WORKERS, True)}  # fmt: skip
    print(
        f"  cnn-blocks {MODEL['widths']} + batch norm on the npy store, batch {BATCH}, "
        "2 epochs (the second timed):"
    )
    measured = {}
    for name, (access, workers, amp) in runs.items():
        config = TrainConfig(
            data=stores["npy"], device=GPU, access=access, workers=workers, amp=amp, epochs=2,
            batch_size=BATCH, out=os.path.join(tmp, f"train-{access}-{workers}-{amp}"), **MODEL,
        )  # fmt: skip
        progress.console.quiet = True  # the epoch lines; the summary is printed here
        try:
            with Sampler(0.1) as sampler:
                result = train(config)
                telemetry = sampler.window()
        finally:
            progress.console.quiet = False
        last = result.history[-1]
        split = result.metrics["eval_split"] or "val"
        entry = {
            "epoch_s": last["time_s"], "first_epoch_s": result.history[0]["time_s"],
            "images_per_s": last["images_per_s"], "data_wait_s": last["data_wait_s"],
            "train_loss": last["train_loss"], "accuracy": last[f"{split}_accuracy"],
            "gpu_util_pct_mean": telemetry["gpu_util_pct_mean"],
            "gpu_mem_used_bytes_max": telemetry["gpu_mem_used_bytes_max"],
        }  # fmt: skip
        measured[name] = entry
        util = entry["gpu_util_pct_mean"]
        print(f"  {name:34s} {entry['epoch_s']:6.2f} s/epoch (first {entry['first_epoch_s']:.2f}"
              f" s), {entry['images_per_s']:9,.0f} img/s, data wait "
              f"{100 * entry['data_wait_s'] / entry['epoch_s']:4.1f}%, loss "
              f"{entry['train_loss']:.3f}, {split} accuracy {entry['accuracy']:.3f}, GPU "
              f"{'?' if util is None else f'{util:.0f}'}% busy", flush=True)  # fmt: skip
        on_gpu = all(p.device.type == torch.device(GPU).type for p in result.model.parameters())
        results.check(
            f"training ({name}): losses finite, model on the GPU",
            on_gpu and result.metrics["device"].startswith(GPU)
            and all(math.isfinite(r["train_loss"]) for r in result.history)
            and math.isfinite(result.metrics[split]["loss"]),
        )  # fmt: skip
        results.check(
            f"training ({name}): the sampler read the GPU",
            util is not None and (entry["gpu_mem_used_bytes_max"] or 0) > 0,
            f"{util}% busy on average, {(entry['gpu_mem_used_bytes_max'] or 0) / 2**30:.1f} GiB "
            "used at most",
        )  # fmt: skip
    results.data["training"] = measured
    fp32, amp = measured["device access, fp32"], measured["device access, AMP"]
    print(f"  AMP / fp32 epoch time (device access): {amp['epoch_s'] / fp32['epoch_s']:.2f}")
    results.target("training with device access: data wait share of the epoch",
                   fp32["data_wait_s"] / fp32["epoch_s"], 0.05, at_most=True)  # fmt: skip
    classes = len(loadbench.open_store(stores["npy"]).classes)
    results.target(f"accuracy after 2 epochs (fp32, device access) / chance (1/{classes})",
                   fp32["accuracy"] * classes, 2.0)  # fmt: skip


def default_formats(results: Results, tmp: str, count: int) -> None:
    """The default experiment's formats on cuda, each in train and loader-only mode (with the
    dataset's compute-only ceiling): loader img/s, accelerator utilisation, stall and bound."""
    from loadbench.bench.experiment import Experiment, load_experiment
    from loadbench.bench.runner import run_experiment
    from loadbench.report.bounds import bound_name
    from loadbench.report.data import load_results

    formats = load_experiment(None).formats
    spec = f"synthetic:cifar-like?count={count}&eval_count={max(200, count // 10)}"
    experiment = Experiment.model_validate({
        "name": "gpu-default-formats", "device": GPU, "epochs": 2, "repeats": 1,
        "batch_size": BATCH, "datasets": [{"source": spec, "name": "cifar-like"}],
        "formats": formats, "access": ["batch"], "workers": [WORKERS], "ceilings": True,
        "train": {**MODEL},
    })  # fmt: skip
    progress.console.quiet = True
    try:
        outcome = run_experiment(experiment, os.path.join(tmp, "bench"), os.path.join(tmp, "st"))
    finally:
        progress.console.quiet = False
    ran = load_results(os.path.join(tmp, "bench"))
    compute = ran.ceilings.loc[ran.ceilings["mode"] == "compute-only", "epoch_s"].median()
    loader = ran.ceilings[ran.ceilings["mode"] == "loader-only"].set_index("format")
    print(f"  {spec}, batch {BATCH}, batch access, {WORKERS} workers, cnn-blocks "
          f"{MODEL['widths']}; epoch 2 of 2; compute-only epoch {compute:.3f} s")  # fmt: skip
    print(f"  {'format':12s} {'loader img/s':>13s} {'train img/s':>12s} {'AU':>5s} "
          f"{'stall':>6s}  bound")  # fmt: skip
    rows = {}
    for _, run in ran.runs.sort_values("epoch_s").iterrows():
        fmt = run["format"]
        loader_s = loader["epoch_s"].get(fmt, math.nan)
        rows[fmt] = {"loader_images_per_s": loader["images_per_s"].get(fmt, math.nan),
                     "train_images_per_s": run["images_per_s"], "au": run["au"],
                     "stall_share": run["stall_share"], "epoch_s": run["epoch_s"],
                     "loader_epoch_s": loader_s,
                     "bound": bound_name(loader_s, compute)}  # fmt: skip
        r = rows[fmt]
        print(f"  {fmt:12s} {r['loader_images_per_s']:13,.0f} {r['train_images_per_s']:12,.0f} "
              f"{100 * r['au']:4.0f}% {100 * r['stall_share']:5.0f}%  {r['bound']}",
              flush=True)  # fmt: skip
    results.data["default_formats"] = {"compute_only_epoch_s": compute, "formats": rows,
                                       "failures": outcome.failures}  # fmt: skip
    timed = set(ran.runs["timing"]) == {"overlap"} and ran.runs["au"].between(0, 1).all()
    results.check("default formats on cuda: every run finished", outcome.failed == 0,
                  "; ".join(f"{what}: {why}" for what, why in outcome.failures)[:500])  # fmt: skip
    results.check("default formats on cuda: train runs timed with overlap, AU in [0, 1]", timed)


def host_to_device(results: Results, tmp: str, mib: int, repeats: int = 3) -> None:
    from loadbench.formats.tensor import load_resident

    try:
        import cupy
    except Exception:  # not installed, or not for this driver
        cupy = None
    path = os.path.join(tmp, "h2d.npy")
    array = np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8)
    np.save(path, array)
    np.load(path)  # in the page cache now, as a store read more than once is
    pinned = torch.from_numpy(array).pin_memory()

    def free() -> None:
        if on_cuda():
            torch.cuda.empty_cache()
        if cupy is not None:
            cupy.get_default_memory_pool().free_all_blocks()

    methods = {
        f"tensor format ({'CuPy + DLPack' if cupy else 'no CuPy: np.load + copy'})":
            lambda: load_resident(path, GPU),
        "np.load + copy from pageable memory": lambda: torch.from_numpy(np.load(path)).to(GPU),
        "np.load + pin + copy": lambda: torch.from_numpy(np.load(path)).pin_memory().to(
            GPU, non_blocking=True),
        "copy of memory already pinned (ceiling)": lambda: pinned.to(GPU, non_blocking=True),
    }  # fmt: skip
    rates = {}
    print(f"  {mib} MiB .npy (page cache warm) onto the GPU, GB/s (best of {repeats}):")
    for name, load in methods.items():
        best = math.inf
        for _ in range(repeats):
            free()
            sync()
            started = time.perf_counter()
            out = load()
            sync()
            best = min(best, time.perf_counter() - started)
            del out
        rates[name] = array.nbytes / best / 1e9
        print(f"  {name:42s} {rates[name]:7.2f}", flush=True)
    results.data["host_to_device_gb_per_s"] = rates

    free()
    sync()
    before = allocated()
    images = load_resident(path, GPU)
    torch_bytes = allocated() - before
    same = torch.equal(images, torch.from_numpy(array).to(GPU))
    results.check("tensor format: the whole file on the GPU, byte for byte",
                  images.device.type == torch.device(GPU).type and same)  # fmt: skip
    if cupy is not None:
        results.check("tensor format: CuPy's memory shared with torch (no second copy)",
                      torch_bytes < images.nbytes,
                      f"torch allocated {torch_bytes / 2**20:.0f} MiB for a "
                      f"{images.nbytes / 2**20:.0f} MiB file")  # fmt: skip
    del images
    free()
    first = next(iter(methods))
    results.target("tensor format load / np.load + copy from pageable memory",
                   rates[first] / rates["np.load + copy from pageable memory"], 1.0)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="training images (32x32 RGB)")
    parser.add_argument("--epochs", type=int, default=4, help="loader-only epochs per setting")
    parser.add_argument("--h2d-mib", type=int, default=1024, help="size of the host->device file")
    parser.add_argument("--bench-count", type=int, default=5000,
                        help="training images of the default-formats bench")  # fmt: skip
    parser.add_argument("--json", help="also write every number and check to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}): nothing measured")  # fmt: skip
        return 0
    started = time.perf_counter()
    results = Results()
    results.data["machine"] = header()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        stores = results.section("stores", make_stores, tmp, args.count)
        if stores is not None:
            results.section("loaders", loaders, stores, args.epochs)
            results.section("the tensor format's reads", tensor_reads, stores)
            results.section("training on cuda", training, stores, tmp)
        results.section("the default formats on cuda", default_formats, tmp, args.bench_count)
        results.section("host to device", host_to_device, tmp, args.h2d_mib)
    seconds = time.perf_counter() - started
    failed = [c["name"] for c in results.checks if not c["passed"]]
    missed = [t["name"] for t in results.targets if not t["met"]]
    print(f"\n{len(results.checks) - len(failed)} of {len(results.checks)} checks passed, "
          f"{len(results.targets) - len(missed)} of {len(results.targets)} targets met, "
          f"in {seconds:.0f} s")  # fmt: skip
    for name in failed:
        print(f"  FAILED: {name}")
    for name in missed:
        print(f"  missed: {name}")
    if args.json:
        report = {**results.data, "checks": results.checks, "targets": results.targets,
                  "seconds": seconds}  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failed or not results.checks else 0


if __name__ == "__main__":
    sys.exit(main())
