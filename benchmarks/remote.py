"""Local disk against object storage on loopback: loader-only images/s per format, read in place
and through the read-through cache, measured in one run with `loadbench bench`.

Starts a real S3-compatible server (moto's ThreadedMotoServer) on 127.0.0.1, converts a
`cifar-like` source into every format on local disk and into a bucket, and runs loader-only
epochs (no model) from each: local, `s3` read in place (byte ranges, whole objects, zarr's
fsspec store, h5py through a file object) and `s3+cache` (a local copy made on first read).
Loopback has no network latency to speak of: what the ratios show is the cost of going through
an object-storage protocol (HTTP requests, SDK, server), a lower bound for a real network.

    python benchmarks/remote.py [--count 10000] [--repeats 2] [--out bench-remote]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile

from loadbench.bench.experiment import Experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment

FORMATS = ["npy", "hdf5", "zarr", "lmdb", "webdataset", "tfrecord", "files-jpeg", "tensor"]
FORMAT_OPTIONS = {"hdf5": {"chunk_images": 256}}


def start_server() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    })  # fmt: skip
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="training images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--access", default="batch", help="sample or batch")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", default="bench-remote", help="results directory")
    args = parser.parse_args()

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server, endpoint = start_server()
    cache = tempfile.mkdtemp(prefix="loadbench-read-through-")
    stores = tempfile.mkdtemp(prefix="loadbench-remote-stores-")
    shutil.rmtree(args.out, ignore_errors=True)
    try:
        experiment = Experiment.model_validate({
            "name": "remote",
            "datasets": [{"source": f"synthetic:cifar-like?count={args.count}&eval_count=1000",
                          "name": "cifar-like"}],
            "formats": FORMATS, "format_options": FORMAT_OPTIONS,
            "access": [args.access], "workers": [args.workers], "batch_size": 256,
            "mode": "loader-only", "epochs": args.epochs, "repeats": args.repeats,
            "storage": [
                "local",
                {"url": "s3://bench/stores", "endpoint_url": endpoint},
                {"url": "s3://bench/stores", "endpoint_url": endpoint, "cache_dir": cache,
                 "name": "s3+cache"},
            ],
            # Cold: the read-through copy is deleted before each run, so epoch 1 fills it.
            "cache": "cold",
        })  # fmt: skip
        outcome = run_experiment(experiment, args.out, stores)
        print(f"runs ok {outcome.ok}, failed {outcome.failed}, not run {len(outcome.not_run)}")
        for label, why in outcome.not_run:
            print(f"  not run: {label}: {why}")
        table(read_runs(args.out))
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(stores, ignore_errors=True)


def table(records: list[dict]) -> None:
    """Steady-state images/s (epochs after the first) per storage and their ratio to local
    disk; and the time to open the store and finish epoch 1, which holds the cache's fill
    (a reader may fetch its files whole when it opens, before the first epoch)."""
    rates: dict[tuple[str, str], list[float]] = {}
    starts: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("status") != "ok":
            print(f"failed: {r['format']} @{r.get('storage')}: {r.get('error')}")
            continue
        epochs = r["epochs"]
        key = (r["format"], r.get("storage", "local"))
        rates.setdefault(key, []).append(statistics.median(e["images_per_s"] for e in epochs[1:]))
        starts.setdefault(key, []).append(r["setup"]["time_s"] + epochs[0]["time_s"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    start = {k: statistics.median(v) for k, v in starts.items()}
    print()
    print(
        "| format | local img/s | s3 img/s | s3 / local | s3+cache img/s | s3+cache / local "
        "| open + epoch 1 s: local / s3 / s3+cache |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for fmt in FORMATS:
        local = med.get((fmt, "local"))
        if local is None:
            continue
        remote, cached = med.get((fmt, "s3")), med.get((fmt, "s3+cache"))

        def cell(v, ratio=False, local=local):
            if v is None:
                return "-"
            return f"{v / local:.2f}" if ratio else f"{v:,.0f}"

        opened = " / ".join(
            f"{start[(fmt, s)]:.2f}" if (fmt, s) in start else "-"
            for s in ("local", "s3", "s3+cache")
        )
        print(
            f"| {fmt} | {local:,.0f} | {cell(remote)} | {cell(remote, True)} | {cell(cached)} "
            f"| {cell(cached, True)} | {opened} |"
        )


if __name__ == "__main__":
    main()
