"""loadbench's fast paths against their references, measured in one run (issue 17, item 3).

1. The public API over an npy store (N x 32x32x3): `store.read_batch("train", idx)` for
   shuffled batches of 256, against the same gather from a uint8 torch tensor of the whole
   split converted to float32 N,C,H,W (the in-RAM reference: the faster of torch's default
   threads and one thread), and against the per-sample path (`store.dataset` + DataLoader,
   0 workers, batch 256). Targets: >= 0.5x the reference, >= 10x the per-sample path.
2. Image files (files-jpeg, files-png; 32x32 and 512x512): loader-only epochs of each access
   mode (sample and batch with 2 workers, threads with 2 threads, batch in one process), NVIDIA
   DALI's CPU pipeline with 2 threads where it is installed (readers.file + decoders.image +
   crop_mirror_normalize to float CHW, batch 256), and the single-core decode rate x cores (the
   images' bytes in memory, `codecs.decode_into`): how far each path is from it.

Configurations run interleaved, `--rounds` times; each prints its best steady epoch (the first
epoch of a loader, which starts its workers, is left out) and its CPU time an image (this
process and its worker processes), which a busy machine disturbs less than wall time. The
machine is shared and noisy: compare within one run, and read the load average printed.

    python benchmarks/fast_paths.py [--stores DIR] [--count 20000] [--big-count 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
import psutil
import torch
from _machine import cpu_model

import loadbench
from loadbench.formats import codecs, libpng, turbojpeg
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.order import EpochOrder

BATCH = 256
ACCESSES = [("sample", 2), ("batch", 2), ("threads", 2), ("batch", 0)]


def stores(root: str, count: int, big: int) -> dict[str, loadbench.Store]:
    """The stores, converted into `root` unless already there."""
    specs = {
        "npy 32x32": ("cifar-like", count, "npy"),
        "jpeg 32x32": ("cifar-like", count, "files-jpeg"),
        "png 32x32": ("cifar-like", count, "files-png"),
        "jpeg 512x512": ("masks-like", big, "files-jpeg"),
        "png 512x512": ("masks-like", big, "files-png"),
    }
    made = {}
    for name, (preset, n, fmt) in specs.items():
        path = os.path.join(root, name.replace(" ", "-"))
        if os.path.isfile(os.path.join(path, "manifest.json")):
            made[name] = loadbench.open_store(path)
        else:
            made[name] = loadbench.convert(f"synthetic:{preset}?count={n}&eval_count=8", fmt, path)
    return made


def best_rate(run, repeats: int = 5) -> float:
    """Images/s of the fastest of `repeats` calls of `run` (which returns its images)."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - started))
    return max(rates)


def public_api(store) -> dict[str, float]:
    """read_batch, the in-RAM reference and the per-sample DataLoader path, images/s."""
    reader = store.raw("train")
    n = reader.count
    perm = np.random.default_rng(0).permutation(n)
    batches = [perm[i : i + BATCH] for i in range(0, n, BATCH)]
    whole = torch.from_numpy(np.array(reader.handle["images"]))  # the split in RAM, uint8

    def read_batch():
        for b in batches:
            store.read_batch("train", b)
        return n

    def gather():
        for b in batches:
            whole[torch.from_numpy(b)].permute(0, 3, 1, 2).float().div_(255)
        return n

    def per_sample():
        loader = torch.utils.data.DataLoader(store.dataset("train"), batch_size=BATCH,
                                             shuffle=True, num_workers=0)  # fmt: skip
        return sum(len(y) for _, y in loader)

    threads = torch.get_num_threads()
    reference = best_rate(gather)
    torch.set_num_threads(1)
    reference_one = best_rate(gather)
    torch.set_num_threads(threads)
    return {"read_batch": best_rate(read_batch), "reference": max(reference, reference_one),
            "reference_threads": reference, "reference_one_thread": reference_one,
            "per_sample": best_rate(per_sample, 2)}  # fmt: skip


def cpu_s() -> float:
    """CPU seconds of this process and its children (DataLoader workers) so far."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a worker that just ended
            total += sum(child.cpu_times()[:2])
    return total


def epochs_rate(epoch, epochs: int) -> tuple[float, float]:
    """(images/s of the best steady epoch, CPU us an image of the leanest), epoch 1 left out:
    `epoch()` runs one epoch and returns its images."""
    rates, cpus = [], []
    for number in range(1, epochs + 1):
        cpu, started = cpu_s(), time.perf_counter()
        n = epoch(number)
        rates.append(n / (time.perf_counter() - started))
        cpus.append((cpu_s() - cpu) / n * 1e6)
    return max(rates[1:]), min(cpus[1:])


def loader_rate(store, access: str, workers: int, epochs: int = 3) -> tuple[float, float]:
    """`epochs_rate` of loader-only epochs of `access` with `workers`."""
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=0)
    batches = make_batches(store, "train", order, access=access, batch_size=BATCH,
                           workers=workers, pin_memory=False, device="cpu",
                           augmenter=None)  # fmt: skip

    def epoch(number: int) -> int:
        order.set_epoch(number)
        return sum(len(y) for _, y in batches)

    try:
        return epochs_rate(epoch, epochs)
    finally:
        shutdown(batches)


def dali_rate(store, threads: int = 2, epochs: int = 3) -> tuple[float, float] | None:
    """`epochs_rate` of DALI's CPU pipeline over the store's class folders (None: no DALI)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None

    @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None)
    def pipeline():
        files, labels = fn.readers.file(file_root=os.path.join(store.path, "train"),
                                        random_shuffle=True, name="files")  # fmt: skip
        images = fn.decoders.image(files, device="cpu")
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[0.0], std=[255.0])  # fmt: skip
        return images, labels

    pipe = pipeline()
    pipe.build()
    total = pipe.epoch_size("files")

    def epoch(number: int) -> int:
        n = 0
        while n < total:
            n += len(pipe.run()[0])
        return n

    return epochs_rate(epoch, epochs)


def decode_rate(store, items: int = 2000) -> float:
    """One core's decode rate of the store's images from memory (`codecs.decode_into`)."""
    reader = store.raw("train")
    labels = reader.labels()
    n = min(items, reader.count)
    datas = []
    for i in range(n):
        with open(reader.path(i, int(labels[i])), "rb") as f:
            datas.append(f.read())
    out = np.empty(reader.image_shape, np.uint8)

    def run():
        for data in datas:
            codecs.decode_into(data, out)
        return n

    return best_rate(run, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", default="bench-fast-paths")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--big-count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"# fast paths, {time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {cores} cores, "
          f"torch {torch.__version__}, TurboJPEG {turbojpeg.available()}, "
          f"libpng {libpng.available()}")  # fmt: skip
    made = stores(args.stores, args.count, args.big_count)
    api = [public_api(made["npy 32x32"]) for _ in range(args.rounds)]
    best = {key: max(a[key] for a in api) for key in api[0]}
    print(f"\n## public API, npy {args.count} x 32x32x3, batches of {BATCH}, one process")
    for key, value in best.items():
        print(f"  {key:22s} {value:12,.0f} img/s")
    print(f"  read_batch / reference  {best['read_batch'] / best['reference']:.2f} (target 0.5)")
    print(f"  read_batch / per-sample {best['read_batch'] / best['per_sample']:.1f} (target 10)")
    files = [name for name in made if not name.startswith("npy")]
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for name in files:
            for access, workers in ACCESSES:
                key = f"{access} {'w' if access != 'threads' else 't'}{max(1, workers)}"
                rates.setdefault((name, key), []).append(loader_rate(made[name], access, workers))
            dali = dali_rate(made[name])
            if dali is not None:
                rates.setdefault((name, "DALI t2"), []).append(dali)
    print(f"\n## image files, loader-only, batch {BATCH}, best steady epoch of {args.rounds} runs")
    print("img/s (x DALI's, x the ceiling), and CPU us an image (this process and its workers)")
    for name in files:
        ceiling = decode_rate(made[name]) * cores
        n = made[name].counts["train"]
        print(f"\n{name} ({n} files): single-core decode x {cores} cores = {ceiling:,.0f} img/s")
        dali = max((r for r, _ in rates.get((name, "DALI t2"), [])), default=0.0)
        for (store, key), values in rates.items():
            if store != name:
                continue
            rate, cpu = max(r for r, _ in values), min(c for _, c in values)
            vs_dali = f"{rate / dali:5.2f}x DALI" if dali else "  (no DALI)"
            print(
                f"  {key:10s} {rate:9,.0f} img/s  {vs_dali}  {rate / ceiling:5.2f}x ceiling"
                f"  {cpu:8.1f} us CPU  (rounds: {', '.join(f'{r:,.0f}' for r, _ in values)})"
            )
    print(f"\nload average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
