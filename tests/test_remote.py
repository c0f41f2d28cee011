"""Stores on object storage: a real S3 server (moto) on loopback, s3:// URLs through fsspec."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import loadbench
from loadbench.bench.experiment import load_experiment
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.errors import LoadbenchError
from loadbench.formats import FORMAT_NAMES, get_format
from loadbench.remote import storage_options
from loadbench.store import open_store
from loadbench.verify import verify_path

SECRET = "s3cr3t-never-written-anywhere"
SOURCE = "synthetic:cifar-like?count=60&eval_count=20&size=12&classes=3"
# Read through a local copy only (zarr zip too, option-dependent).
LOCAL_FILE_FORMATS = {"lmdb", "arrayrecord"}
REMOTE_FORMATS = [n for n in FORMAT_NAMES if not get_format(n).peer]


@contextlib.contextmanager
def environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class S3:
    """A moto S3 server on 127.0.0.1 and the environment that points the AWS SDK at it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "loadbench-test",
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
        }  # fmt: skip

    def bucket(self, name: str) -> str:
        import boto3

        with environment(**self.env):
            boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def s3():
    server = S3()
    with environment(**server.env):
        yield server
    with contextlib.suppress(Exception):
        server.stop()


@pytest.fixture(scope="module")
def source():
    return loadbench.load_source(SOURCE).in_memory()


@pytest.fixture(scope="module")
def remote_stores(s3, source, tmp_path_factory):
    """Every loadbench format, converted locally and into the bucket."""
    bucket = s3.bucket("stores")
    local_root = tmp_path_factory.mktemp("local")
    made = {}
    for name in REMOTE_FORMATS:
        local = loadbench.convert(source, name, local_root / name)
        remote = loadbench.convert(source, name, f"{bucket}/set/{name}")
        made[name] = (local, remote)
    return made


def source_store(source):
    from loadbench.store import MemoryStore

    return MemoryStore(source)


def all_images(store, split="train"):
    reader = store.raw(split)
    return reader.read_batch(np.arange(len(reader)))


@pytest.mark.parametrize("name", REMOTE_FORMATS)
def test_every_format_round_trips_through_s3_in_place_and_through_the_cache(
    name, remote_stores, tmp_path
):
    local, remote = remote_stores[name]
    assert remote.path.startswith("s3://stores/set/")
    assert remote.manifest.identity == local.manifest.identity
    want_images, want_labels = all_images(local)
    for cache_dir in (None, tmp_path / "cache"):
        if cache_dir is None and name in LOCAL_FILE_FORMATS:
            with pytest.raises(LoadbenchError, match="--cache-dir"):
                all_images(open_store(remote.path))
            continue
        store = open_store(remote.path, cache_dir=cache_dir)
        images, labels = all_images(store)
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
        shuffled = np.array([7, 3, 59, 0, 3])
        got, _ = store.raw("test" if "test" in store.splits else "train").read_batch(shuffled % 20)
        ref, _ = local.raw("test" if "test" in local.splits else "train").read_batch(shuffled % 20)
        np.testing.assert_array_equal(got, ref)
        store.close()


def test_verify_reads_every_store_under_a_prefix(remote_stores):
    checks = verify_path("s3://stores/set", source=SOURCE)
    checked = {c.store.rsplit("/", 1)[-1] for c in checks}
    assert checked == set(REMOTE_FORMATS) - LOCAL_FILE_FORMATS | {
        n for n in LOCAL_FILE_FORMATS if any(c.store.endswith(n) for c in checks)
    }
    by_store = {c.store.rsplit("/", 1)[-1]: c for c in checks}
    for name in set(REMOTE_FORMATS) - LOCAL_FILE_FORMATS:
        assert by_store[name].passed, (name, by_store[name].problems)
    assert not by_store["lmdb"].passed and "--cache-dir" in " ".join(by_store["lmdb"].problems)


def test_the_read_through_cache_counts_hits_and_misses_in_every_process(remote_stores, tmp_path):
    from loadbench.training.batches import make_batches, shutdown
    from loadbench.training.order import EpochOrder

    _, remote = remote_stores["files-png"]
    cache = tmp_path / "cache"
    first = open_store(remote.path, cache_dir=cache)
    all_images(first)
    stats = first.files.cache_stats()
    assert stats["misses"] == 60 + 1 and stats["hits"] == 0  # 60 images + labels.npy
    assert stats["hit_rate"] == 0.0 and stats["miss_bytes"] > 0

    again = open_store(remote.path, cache_dir=cache)
    labels = again.raw("train").labels()
    order = EpochOrder(np.arange(60), labels, seed=0)
    batches = make_batches(again, "train", order, access="sample", batch_size=16, workers=2,
                           pin_memory=False, device="cpu", augmenter=None)  # fmt: skip
    seen = sum(len(y) for _, y in batches)
    shutdown(batches)
    stats = again.files.cache_stats()
    assert seen == 60
    # Every image came from the local copy, read in the two worker processes.
    assert stats["misses"] == 0 and stats["hits"] >= 60 and stats["hit_rate"] == 1.0
    assert again.files.counters.table[1:].sum() > 0


def test_a_store_converted_again_is_reused_or_replaced_never_served_stale(s3, source, tmp_path):
    bucket = s3.bucket("again")
    url = f"{bucket}/npy"
    first = loadbench.convert(source, "npy", url)
    assert not first.skipped
    assert loadbench.convert(source, "npy", url).skipped
    with pytest.raises(LoadbenchError, match="already holds a different store"):
        loadbench.convert(source, "npy", url, "float16")
    cache = tmp_path / "cache"
    all_images(open_store(url, cache_dir=cache))
    replaced = loadbench.convert(source, "npy", url, "float16", overwrite=True)
    assert replaced.dtype == "float16"
    images, _ = all_images(open_store(url, cache_dir=cache))
    assert images.dtype == np.float16  # the cache is keyed by identity: no stale uint8 copy


def test_an_upload_cut_short_is_not_a_store(s3, source, monkeypatch):
    from loadbench import upload

    bucket = s3.bucket("cut")

    import s3fs

    real = s3fs.S3FileSystem._put_file
    sent = []

    async def dying_put_file(self, lpath, rpath, **kwargs):
        if len(sent) == 2:  # the network goes after two files
            raise ConnectionError("network gone")
        sent.append(rpath)
        return await real(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(upload, "UPLOAD_BATCH", 1)
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", dying_put_file)
    with pytest.raises(LoadbenchError, match="cannot reach"):
        loadbench.convert(source, "npy", f"{bucket}/npy")
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()  # instances bound the patched method
    assert len(sent) == 2
    with pytest.raises(LoadbenchError, match="no manifest.json"):
        open_store(f"{bucket}/npy")
    again = loadbench.convert(source, "npy", f"{bucket}/npy", overwrite=True, jobs=2)
    assert not again.skipped  # written by two processes, then uploaded
    np.testing.assert_array_equal(all_images(again)[0], all_images(source_store(source))[0])
    with pytest.raises(LoadbenchError, match="--jobs -1"):
        loadbench.convert(source, "npy", f"{bucket}/npy", jobs=-1)


def test_bad_urls_buckets_and_credentials_get_one_clear_error(s3, source):
    with pytest.raises(LoadbenchError, match=r"unknown URL scheme nosuch://"):
        open_store("nosuch://bucket/store")
    with pytest.raises(LoadbenchError, match="bucket 'missing-bucket' does not exist"):
        open_store("s3://missing-bucket/store")
    with pytest.raises(LoadbenchError, match="bucket 'missing-bucket' does not exist"):
        loadbench.convert(source, "npy", "s3://missing-bucket/npy")
    with (
        environment(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None),
        pytest.raises(LoadbenchError, match="no credentials found"),
    ):
        open_store("s3://stores/set/npy")


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "loadbench", *map(str, args)], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def test_the_cli_converts_to_s3_verifies_and_trains_from_it(s3, tmp_path):
    bucket = s3.bucket("cli")
    done = cli("convert", SOURCE, "-f", "npy,webdataset", "-o", f"{bucket}/stores")
    assert done.returncode == 0, done.stderr
    assert "npy-uint8" in done.stdout and "webdataset-uint8" in done.stdout
    done = cli("verify", f"{bucket}/stores", "--source", SOURCE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 4 split check(s) passed" in done.stdout
    run = tmp_path / "run"
    done = cli("train", f"{bucket}/stores/webdataset-uint8", "--model", "cnn-blocks",
               "--widths", "4,8", "--epochs", "1", "--batch-size", "16", "--cache-dir",
               tmp_path / "cache", "--out", run)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (run / "model.pt").is_file()
    assert any((tmp_path / "cache").rglob("*.tar"))  # shards were read through the cache
    done = cli("convert", SOURCE, "-f", "npy", "-o", "ftp-nope://x/y")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "unknown URL scheme" in done.stderr


def test_the_server_going_away_mid_epoch_is_a_clear_error(source):
    from loadbench.training.batches import make_batches, shutdown
    from loadbench.training.order import EpochOrder

    server = S3()
    with environment(**server.env):
        bucket = server.bucket("dying")
        store = loadbench.convert(source, "webdataset", f"{bucket}/wds")
        store = open_store(store.path, storage_options=storage_options(retries=1))
        labels = store.raw("train").labels()
        batches = make_batches(store, "train", EpochOrder(np.arange(60), labels, seed=0),
                               access="batch", batch_size=8, workers=0, pin_memory=False,
                               device="cpu", augmenter=None)  # fmt: skip
        iterator = iter(batches)
        images, _ = next(iterator)
        assert images.shape == (8, 3, 12, 12)
        server.stop()
        with pytest.raises(LoadbenchError, match="cannot reach"):
            for _ in iterator:
                pass
        shutdown(batches)


def test_an_experiment_compares_local_disk_and_s3_in_one_report(s3, tmp_path):
    bucket = s3.bucket("bench")
    values = {
        "name": "remote",
        "datasets": [{"source": SOURCE, "name": "tiny"}],
        "formats": ["npy", "zarr", "lmdb", "files-png"],
        "mode": "loader-only",
        "epochs": 2,
        "repeats": 1,
        "batch_size": 16,
        "storage": [
            "local",
            {"url": f"{bucket}/stores", "endpoint_url": s3.endpoint},
            {
                "url": f"{bucket}/stores",
                "endpoint_url": s3.endpoint,
                "cache_dir": str(tmp_path / "cache"),
                "name": "s3-cached",
            },
        ],  # fmt: skip
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(values))
    experiment = load_experiment(str(path))
    results = tmp_path / "results"
    outcome = run_experiment(experiment, results, tmp_path / "stores")
    # lmdb in place on S3 cannot run: it maps a real file.
    assert (outcome.ok, outcome.failed) == (11, 0), outcome.failures
    assert any("lmdb" in label and "cache_dir" in why for label, why in outcome.not_run)
    records = read_runs(results)
    by = {(r["format"], r["storage"]): r for r in records}
    formats = ("npy", "zarr", "lmdb", "files-png")
    assert set(by) == {(f, s) for f in formats for s in ("local", "s3-cached")} | {
        (f, "s3") for f in formats if f != "lmdb"}  # fmt: skip
    assert by["npy", "s3"]["store_path"].startswith("s3://bench/stores/")
    zarr = by["zarr", "s3-cached"]["epochs"]
    assert zarr[0]["read_through"]["misses"] > 0  # epoch 1 fills the copy...
    assert zarr[1].get("read_through", {}).get("misses", 0) == 0  # ...epoch 2 fetches nothing
    files = by["files-png", "s3-cached"]["epochs"]  # one file per image: one lookup per read
    assert files[0]["read_through"]["misses"] == 60 and files[1]["read_through"]["hit_rate"] == 1
    assert "read_through" not in by["npy", "s3"]["epochs"][0]
    from loadbench.report.data import load_results

    assert load_results(str(results))  # the report reads it
    done = cli("report", results)
    assert done.returncode == 0, done.stderr
    report = (results / "report.md").read_text() if (results / "report.md").exists() else ""
    report = report or "\n".join(p.read_text() for p in results.rglob("*.md"))
    assert "vs local" in report
    # No secret anywhere in what the experiment left behind.
    for file in results.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    env = json.loads((results / "env.json").read_text())
    assert SECRET not in json.dumps(env)


def test_nearby_byte_ranges_become_one_request():
    from loadbench.remote import coalesce

    ranges, owner = coalesce([100, 0, 5000, 50], [200, 10, 5010, 60], gap=1000, limit=4096)
    assert ranges == [(0, 200), (5000, 5010)]
    assert owner == [0, 0, 1, 0]
    # A request never grows past the limit by merging (a single larger range stays whole).
    ranges, _ = coalesce([0, 3000, 6000], [3000, 6000, 9000], gap=1000, limit=4096)
    assert ranges == [(0, 3000), (3000, 6000), (6000, 9000)]
