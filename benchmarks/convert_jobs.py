"""Conversion wall time with `--jobs 1` and `--jobs N`, per format, and the speed-up.

Converts a `cifar-like` source of 20,000 32x32 images (train only) into a few formats, each
twice: with the source generated on demand, as `loadbench convert synthetic:...` reads it, and
with the source already decoded in memory, as `--format all` and CIFAR/MNIST files give it.
Every conversion runs in a fresh process that has imported torch and torchvision (their import,
2-4 s, is not counted) and times `convert()` alone, wall clock and CPU (its own and its
workers'). Jobs 1 and N alternate; the best of the repeats is reported, because on a shared
machine other work only ever adds time. At the start and the end it measures what N processes
get at all: the speed-up of zlib on random bytes, nothing shared. Compare within one run.

    python benchmarks/convert_jobs.py [--count 20000] [--jobs 2] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

CASES = [
    ("files-jpeg", {}),
    ("files-png", {}),
    ("webdataset", {"encoding": "png"}),
    ("zarr", {"compression": "zstd"}),
    ("npy", {}),
    ("hdf5", {}),
]
SOURCES = {"generated": False, "in memory": True}

ONE_RUN = textwrap.dedent("""
    import json, resource, sys, time
    import torch, torchvision.io  # imported up front: not part of the conversion
    import loadbench
    spec, fmt, options, out, jobs, in_memory = json.loads(sys.argv[1])
    source = loadbench.load_source(spec)
    if in_memory:
        source = source.in_memory()
    def cpu_s():
        return sum(r.ru_utime + r.ru_stime for r in (
            resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
    cpu, started = cpu_s(), time.perf_counter()
    loadbench.convert(source, fmt, out, jobs=jobs, **options)
    print(json.dumps({"wall_s": time.perf_counter() - started, "cpu_s": cpu_s() - cpu}))
""")


def measure(spec: str, fmt: str, options: dict, jobs: int, in_memory: bool, root: str) -> dict:
    out = tempfile.mkdtemp(dir=root)
    args = json.dumps([spec, fmt, options, os.path.join(out, "store"), jobs, in_memory])
    try:
        done = subprocess.run(
            [sys.executable, "-c", ONE_RUN, args], capture_output=True, text=True, check=True
        )
    finally:
        shutil.rmtree(out)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compress(_: int) -> None:
    data = os.urandom(1 << 20)
    for _ in range(40):
        zlib.compress(data, 6)


def ceiling(jobs: int, repeats: int) -> float:
    """The speed-up of N processes on a task with nothing shared (zlib on random bytes): what
    the machine gives N processes at the time, other users' load included."""
    best: dict[int, float] = {}
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for _ in range(repeats):
            for n in (1, jobs):
                started = time.perf_counter()
                pool.map(_compress, range(n))
                best[n] = min(best.get(n, 1e9), (time.perf_counter() - started) / n)
    return best[1] / best[jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="images (train split)")
    parser.add_argument("--jobs", type=int, default=2, help="the N compared with 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 images, one repeat")
    parser.add_argument("--root", default=None, help="where the stores are written (a temp dir)")
    args = parser.parse_args()
    count, repeats = (2_000, 1) if args.quick else (args.count, args.repeats)
    spec = f"synthetic:cifar-like?count={count}&eval_count=0"
    root = tempfile.mkdtemp(prefix="convert-jobs-", dir=args.root)
    n = args.jobs
    print(f"{spec}, {os.cpu_count()} cores, jobs 1 vs {n}, best of {repeats}, "
          f"load average {os.getloadavg()[0]:.1f} at the start; {n} processes of zlib "
          f"(nothing shared) ran {ceiling(n, repeats):.2f}x faster\n")  # fmt: skip
    print(f"| format | source | jobs 1 (s) | jobs {n} (s) | speed-up | CPU s, jobs 1 / {n} |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt, options in CASES:
        for source_name, in_memory in SOURCES.items():
            runs: dict[int, list[dict]] = {1: [], n: []}
            for _ in range(repeats):
                for jobs in runs:  # alternate, so that drifting load hits both alike
                    runs[jobs].append(measure(spec, fmt, options, jobs, in_memory, root))
            one, many = (min(runs[j], key=lambda r: r["wall_s"]) for j in (1, n))
            label = fmt + "".join(f" {k}={v}" for k, v in options.items())
            speed_up = one["wall_s"] / many["wall_s"]
            print(
                f"| {label} | {source_name} | {one['wall_s']:.2f} | {many['wall_s']:.2f} | "
                f"{speed_up:.2f}x | {one['cpu_s']:.1f} / {many['cpu_s']:.1f} |",
                flush=True,
            )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; {n} processes of zlib ran "
          f"{ceiling(n, repeats):.2f}x faster")  # fmt: skip
    os.rmdir(root)


if __name__ == "__main__":
    main()
