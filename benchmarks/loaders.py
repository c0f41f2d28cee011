"""Loader speed side by side: loadbench's formats and access modes, the peer loaders, and the
ceilings of this machine, measured in one run, with the ratios issues 6 and 17 set as targets.

Runs loader-only epochs (no model: the loader's own ceiling) through `loadbench bench` over a
`cifar-like` source of 50,000 32x32 images, a `tinyimagenet-like` source of 20,000 64x64 images
and a `masks-like` source of 500 512x512 images, warm page cache, then a short training run for
the data-stall share, and measures in this process the references the ratios need: a plain
in-RAM torch tensor gathered batch by batch, the naive per-item read of chunked stores (no
cache), and the one-core JPEG decode rate. The `kinds` experiments set loadbench's fastest path
on each kind of data (image files, arrays, records) beside every peer loader of that kind, at
the same CPU budget (`_kinds.py`). Every number comes from this run; compare within it (the
machine is shared and noisy).

    python benchmarks/loaders.py [--out bench-loaders] [--repeats 3] [--quick]
                                 [--only kinds,kinds-png] [--markdown kinds.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _kinds
import numpy as np
import pandas as pd
import torch
from _machine import cpu_model

import loadbench
from loadbench.bench.env import library_versions
from loadbench.bench.experiment import Experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.formats import codecs, get_format, is_format
from loadbench.formats.pixels import to_tensor
from loadbench.report.data import load_results
from loadbench.training.batches import make_batches
from loadbench.training.order import EpochOrder

DATASETS = {
    "cifar-like": "synthetic:cifar-like?count={n}&eval_count=1000",
    "tinyimagenet-like": "synthetic:tinyimagenet-like?count={n}&eval_count=1000",
    "masks-like": "synthetic:masks-like?count={n}&eval_count=50",
}
COUNTS = {"cifar-like": 50_000, "tinyimagenet-like": 20_000, "masks-like": 500}
FORMATS = ["files-jpeg", "files-png", "npy", "hdf5", "zarr", "lmdb", "webdataset", "tfrecord",
           "arrayrecord", "tensor"]  # fmt: skip
BATCH = 256
# Chunked HDF5 (256 images a chunk, like zarr's default for 32x32) is the one the targets name.
FORMAT_OPTIONS = {"hdf5": {"chunk_images": 256}, "torchvision-imagefolder": {"encoding": "jpeg"}}


def experiments(counts: dict[str, int], repeats: int) -> dict[str, dict]:
    every = [{"source": DATASETS[name].format(n=n), "name": name} for name, n in counts.items()]
    datasets = every[:2]  # cifar-like and tinyimagenet-like: the masks are for the kinds
    common = {"datasets": datasets, "batch_size": BATCH, "mode": "loader-only", "epochs": 3,
              "repeats": repeats, "format_options": FORMAT_OPTIONS}  # fmt: skip
    train_count = min(10_000, counts["cifar-like"])
    return {
        **_kinds.experiments(every, common),
        "loaders": {
            **common,
            "name": "loaders",
            "formats": [f for f in FORMATS if is_format(f)],
            "access": ["sample", "batch"],
            "workers": [0, 2],
        },  # fmt: skip
        "device": {
            **common,
            "name": "device",
            "formats": ["tensor", "npy"],
            "access": ["device"],
            "workers": [0],
        },  # fmt: skip
        # A cache smaller than the split (16 MiB of 154 MB): exact order misses, block order not.
        "block": {
            **common,
            "name": "block",
            "formats": ["zarr", "hdf5"],
            "access": ["sample"],
            "workers": [0, 2],
            "shuffle": ["exact", "block"],
            "chunk_cache_mb": 16,
            "datasets": datasets[:1],
        },  # fmt: skip
        "train": {
            "name": "train",
            "batch_size": 64,
            "epochs": 3,
            "repeats": max(1, repeats - 1),
            "datasets": [
                {"source": DATASETS["cifar-like"].format(n=train_count), "name": "cifar-like"}
            ],
            "formats": ["npy", "hdf5", "zarr", "tensor"],
            "access": ["batch", "device"],
            "workers": [0],
            "format_options": FORMAT_OPTIONS,
            "train": {"model": "cnn-blocks", "widths": "16,32,64", "batch_norm": True},
        },  # fmt: skip
    }


def in_ram_ceiling(n: int, shape: tuple[int, int, int], epochs: int = 3) -> float:
    """Images/s of the least work any loader must do: gather shuffled batches from a uint8
    tensor already in RAM and convert them to float32 (N, C, H, W)."""
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    rates = []
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng(epoch).permutation(n))
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            to_tensor(images[order[start : start + BATCH]])
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def naive_chunked_rate(store_path: str, items: int = 2000) -> float:
    """Per-item shuffled reads of a chunked store with the chunk cache off."""
    store = loadbench.open_store(store_path)
    store.chunk_cache_bytes = 0
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=0)
    batches = make_batches(store, "train", order, access="sample", batch_size=BATCH,
                           workers=0, pin_memory=False, device="cpu", augmenter=None)  # fmt: skip
    dataset = batches.dataset
    keys = list(iter(batches.sampler))[:items]
    t0 = time.perf_counter()
    for key in keys:
        dataset[key]
    return items / (time.perf_counter() - t0)


def jpeg_decode_rate(store_path: str, items: int = 3000) -> float:
    """One core decoding the store's own JPEG files from memory (no file system)."""
    root = os.path.join(store_path, "train")
    files = []
    for folder in sorted(os.listdir(root)):
        path = os.path.join(root, folder)
        if os.path.isdir(path):
            files += [os.path.join(path, f) for f in sorted(os.listdir(path))[:50]]
    data = [open(f, "rb").read() for f in files[:500]]  # noqa: SIM115
    codecs.decode(data[0], 3)  # the first call imports the decoder
    t0 = time.perf_counter()
    for k in range(items):
        codecs.decode(data[k % len(data)], 3)
    return items / (time.perf_counter() - t0)


def medians(results_dir: str) -> pd.DataFrame:
    runs = load_results(results_dir).runs
    keys = ["dataset", "format", "access", "workers", "shuffle"]
    return runs.groupby(keys, dropna=False).agg(
        images_per_s=("images_per_s", "median"), stall_share=("stall_share", "median"),
        peak_rss_bytes=("peak_rss_bytes", "median"), repeats=("key", "count"),
    ).reset_index()  # fmt: skip


def rate(table, dataset, fmt, access, workers, shuffle="exact") -> float:
    row = table[(table["dataset"] == dataset) & (table["format"] == fmt)
                & (table["access"] == access) & (table["workers"] == workers)
                & (table["shuffle"] == shuffle)]  # fmt: skip
    return float(row["images_per_s"].iloc[0]) if len(row) else float("nan")


def verdict(value: float, target: float) -> str:
    if value != value:
        return "not measured"
    return f"{'met' if value >= target else 'MISSED'} (target >= {target:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-loaders", help="results directories go here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tenth of the images (a check)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated experiments to run "
        "(loaders, device, block, train, kinds, kinds-png); default: all",
    )
    parser.add_argument("--markdown", help="write the kinds table here as Markdown")
    args = parser.parse_args()
    counts = {k: max(v // 10, 100) if args.quick else v for k, v in COUNTS.items()}
    cores = os.cpu_count() or 1
    print(f"loadbench {loadbench.__version__}, torch {torch.__version__}, {cores} cores "
          f"({cpu_model()}), batch {BATCH}, warm cache; images: {counts}")  # fmt: skip
    print("libraries: " + ", ".join(f"{k} {v}" for k, v in library_versions().items() if v))

    tables = {}
    chosen = set(filter(None, args.only.split(",")))
    for name, spec in experiments(counts, args.repeats).items():
        if chosen and name not in chosen:
            continue
        outcome = run_experiment(Experiment.model_validate(spec), os.path.join(args.out, name))
        for cell, why in outcome.not_run:
            if "needs" in why:  # a peer that is not installed
                print(f"  not run: {cell}: {why}")
        for run, error in outcome.failures:
            print(f"  FAILED: {run}: {error}")
        tables[name] = medians(os.path.join(args.out, name))

    if {"kinds", "kinds-png"} <= set(tables):
        kinds = _kinds.kinds_table(tables)
        _kinds.print_kinds(kinds, cores)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(_kinds.markdown(kinds) + "\n")
    if {"loaders", "device", "block", "train"} <= set(tables):
        issue_6(tables, counts, args.out, cores)


def issue_6(tables: dict[str, pd.DataFrame], counts: dict[str, int], out: str, cores: int):
    """The formats' own table and the ratios issue 6 set as targets."""
    loaders = pd.concat([tables["loaders"], tables["device"]])
    print("\nimages/s (median over repeats of the steady-state epochs), loader only:")
    wide = loaders.pivot_table(index=["dataset", "format"], columns=["access", "workers"],
                               values="images_per_s")  # fmt: skip
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(wide.round(0).to_string(na_rep="-"))

    stores = os.path.join(out, "loaders")
    print("\nratios (targets of issue 6):")
    for ds in ("cifar-like", "tinyimagenet-like"):
        n = counts[ds]
        shape = (32, 32, 3) if ds == "cifar-like" else (64, 64, 3)
        ceiling = in_ram_ceiling(n, shape)
        arrays = ["npy", "hdf5", "zarr", "lmdb", "webdataset", "tfrecord", "tensor"]
        best = max(arrays, key=lambda f: max(rate(loaders, ds, f, "batch", w) for w in (0, 2)))
        best_rate = max(rate(loaders, ds, best, "batch", w) for w in (0, 2))
        print(f"[{ds}] in-RAM tensor gather + float: {ceiling:,.0f} img/s")
        print(f"  best array format, batch access ({best}): {best_rate:,.0f} img/s = "
              f"{best_rate / ceiling:.2f} of it: {verdict(best_rate / ceiling, 0.5)}")  # fmt: skip
        for w in (0, 2):
            ratio = rate(loaders, ds, "npy", "batch", w) / rate(loaders, ds, "npy", "sample", w)
            target = 10 if ds == "cifar-like" else 0  # the target is for 32x32 images
            shown = verdict(ratio, target) if target else "(no target)"
            print(f"  npy batch / npy sample, {w} workers: {ratio:.1f}x {shown}")
        jpeg_store = _store_path(stores, ds, "files-jpeg")
        if jpeg_store:
            limit = jpeg_decode_rate(jpeg_store) * cores
            print(f"  JPEG decode on one core, from memory, x {cores} cores: {limit:,.0f} img/s")
            best = max(rate(loaders, ds, "files-jpeg", a, w) for a in ("sample", "batch")
                       for w in (0, 2))  # fmt: skip
            print(f"    files-jpeg reaches {best / limit:.2f} of it")

    block = tables["block"]
    print("\nchunked stores, shuffled sample access, cifar-like (cache 16 MiB in the block run):")
    for fmt in ("zarr", "hdf5"):
        path = _store_path(stores, "cifar-like", fmt)
        naive = naive_chunked_rate(path) if path else float("nan")
        cached = max(rate(loaders, "cifar-like", fmt, "sample", w) for w in (0, 2))
        print(
            f"  {fmt}: naive per item {naive:,.0f} img/s; with the 256 MiB chunk cache "
            f"{cached:,.0f} = {cached / naive:.0f}x naive: {verdict(cached, 50_000)}"
        )
        for w in (0, 2):
            exact = rate(block, "cifar-like", fmt, "sample", w, "exact")
            blocked = rate(block, "cifar-like", fmt, "sample", w, "block")
            print(
                f"    16 MiB cache, {w} workers: exact order {exact:,.0f}, block order "
                f"{blocked:,.0f} img/s ({blocked / exact:.1f}x)"
            )
    quality = load_results(os.path.join(out, "block")).runs
    for order, part in quality.groupby("shuffle"):
        print(
            f"  {order} order: jump ratio {part['order_jump_ratio'].median():.3f}, "
            f"same-class neighbours {part['order_same_class'].median():.3f}"
        )

    print("\ntraining cnn-blocks on cifar-like: data-stall share of epoch time (target <= 5%):")
    for _, row in tables["train"].iterrows():
        share = row["stall_share"]
        print(
            f"  {row['format']}/{row['access']}/w{int(row['workers'])}: {100 * share:.1f}% "
            f"{'met' if share <= 0.05 else 'MISSED'}"
        )


def _store_path(results_dir: str, dataset: str, fmt: str) -> str | None:
    """The store a finished run of `fmt` on `dataset` read."""
    for record in read_runs(results_dir):
        if record.get("dataset") == dataset and record.get("format") == fmt:
            return record.get("store_path")
    return None


if __name__ == "__main__":
    get_format("npy")  # the registry loads before any run
    main()
