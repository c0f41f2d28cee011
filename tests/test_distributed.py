"""Distributed training under torchrun (DDP, gloo on CPU): shards, gathered telemetry,
identical replicas, resume, and benchmark runs launched through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest
import torch
import yaml

import loadbench
from ddp_checks import assert_one_model, torchrun
from loadbench.bench.experiment import Experiment, load_experiment
from loadbench.bench.matrix import expand, plan_runs
from loadbench.bench.records import read_runs
from loadbench.bench.runner import run_experiment
from loadbench.bench.torchrun import failure_summary
from loadbench.errors import LoadbenchError
from loadbench.report.render import write_report
from loadbench.training.distributed import Dist, gather_epoch, straggler_ratio
from loadbench.training.loaders import EpochSampler
from loadbench.training.order import EpochOrder
from loadbench.training.sharding import DEBUG_INDICES, Shard

TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"
TRAIN = ["--widths", "4,8", "--batch-norm", "--batch-size", "16", "--device", "cpu"]


# -- the shard split (no process group needed) -----------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_training_shards_are_distributed_samplers_split(length, world):
    parts = [Shard(rank, world).positions(length) for rank in range(world)]
    for rank, part in enumerate(parts):
        sampler = torch.utils.data.DistributedSampler(
            range(length), num_replicas=world, rank=rank, shuffle=False
        )
        assert part.tolist() == list(sampler)
    per = -(-length // world)
    assert all(len(p) == per for p in parts)  # every rank steps as often
    joined = np.concatenate(parts)
    assert set(joined.tolist()) == set(range(length))  # covers everything
    wrapped = np.resize(np.arange(length), per * world)  # padded by wrapping to the start
    assert sorted(joined.tolist()) == sorted(wrapped.tolist())
    if length % world == 0:
        assert len(set(joined.tolist())) == length  # nothing padded: disjoint


@pytest.mark.parametrize("length,world", [(10, 3), (32, 2), (1, 2), (0, 2)])
def test_evaluation_shards_partition_exactly_in_order(length, world):
    parts = [Shard(rank, world, even=False).positions(length) for rank in range(world)]
    assert np.concatenate(parts).tolist() == list(range(length))  # gathered in rank order
    blocks = [Shard(rank, world, even=False).block(length) for rank in range(world)]
    assert np.concatenate(blocks).tolist() == list(range(length))


def test_device_shards_are_contiguous_padded_blocks():
    blocks = [Shard(rank, 3).block(10) for rank in range(3)]
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_an_epoch_sampler_shard_takes_its_part_of_the_global_order():
    order = EpochOrder(np.arange(100, 150), np.arange(50) % 3, seed=5)
    single = EpochSampler(order)
    ranks = [EpochSampler(order, Shard(rank, 2)) for rank in range(2)]
    for epoch in (1, 2):
        order.set_epoch(epoch)
        whole = list(single)
        parts = [list(sampler) for sampler in ranks]
        assert [len(p) for p in parts] == [25, 25] == [len(s) for s in ranks]
        positions = [{key[0] for key in part} for part in parts]
        assert not positions[0] & positions[1]
        assert positions[0] | positions[1] == set(range(50))
        for part in parts:  # same position, store index and epoch as a single process sees
            assert all(whole[key[0]] == key for key in part)


def test_device_access_keeps_only_the_ranks_block_resident(tmp_path):
    store = loadbench.convert(loadbench.load_source(TINY), "npy", tmp_path / "store")
    labels = store.raw("train").labels()
    order = EpochOrder(np.arange(96), labels, seed=3)
    order.set_epoch(1)
    from loadbench.training.resident import DeviceBatches

    ranks = [DeviceBatches(store, "train", order, 16, "cpu", None, Shard(r, 2)) for r in (0, 1)]
    assert [b.rows.tolist() for b in ranks] == [list(range(48)), list(range(48, 96))]
    for batches in ranks:
        assert len(batches.images) == 48 and len(batches) == 3  # only its half is resident
        got = torch.cat([labels_ for _, labels_ in batches])
        assert sorted(got.tolist()) == sorted(labels[batches.rows].tolist())
    first = torch.cat([images for images, _ in ranks[0]])
    order.set_epoch(2)
    assert not torch.equal(first, torch.cat([images for images, _ in ranks[0]]))  # reshuffled
    oversample = EpochOrder(np.arange(96), labels, seed=3, balance="oversample")
    with pytest.raises(LoadbenchError, match="oversample"):
        DeviceBatches(store, "train", oversample, 16, "cpu", None, Shard(0, 2))


def test_a_single_process_gathers_nothing():
    dist = Dist()
    assert dist.is_main and not dist.active and dist.world == 1
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.sum((1.0, 2)) == (1.0, 2)
    assert dist.wrap(torch.nn.Linear(2, 2)) is None
    record = {"epoch": 1, "time_s": 2.0}
    assert gather_epoch(dist, record, {"peak_rss_bytes": 5}) == {**record, "peak_rss_bytes": 5}
    assert straggler_ratio([{"time_s": 1.0}, {"time_s": 1.0}, {"time_s": 1.5}]) == 1.5


def test_peer_loaders_are_refused_under_ddp_and_skipped_in_a_distributed_matrix(tmp_path):
    source = loadbench.load_source(TINY)
    store = loadbench.convert(source, "torchvision-imagefolder", tmp_path / "peer")
    order = EpochOrder(np.arange(96), store.raw("train").labels(), seed=0)
    from loadbench.training.batches import make_batches

    with pytest.raises(LoadbenchError, match="cannot shard across torchrun"):
        make_batches(store, "train", order, access="sample", batch_size=8, workers=0,
                     pin_memory=False, device="cpu", augmenter=None,
                     shard=Shard(0, 2))  # fmt: skip
    exp = Experiment.model_validate({
        "datasets": [{"source": TINY}], "formats": ["npy", "torchvision-imagefolder"],
        "distributed": {"nproc_per_node": 2},
    })  # fmt: skip
    skips = {c.format: c.skip for c in expand(exp)}
    assert skips["npy"] is None and "not sharded" in skips["torchvision-imagefolder"]


def test_distributed_joins_the_run_key_only_when_set():
    base = {"datasets": [{"source": TINY}], "formats": ["npy"], "repeats": 1}
    plain_exp = Experiment.model_validate(base)
    ddp_exp = Experiment.model_validate({**base, "distributed": {"nproc_per_node": 2}})
    plain, ddp = (plan_runs(e, expand(e))[0] for e in (plain_exp, ddp_exp))
    assert "distributed" not in plain.settings()  # older results keep their keys
    assert ddp.settings()["distributed"] == {"nproc_per_node": 2, "nnodes": 1}
    assert plain.key != ddp.key
    for bad in ({"nproc_per_node": 0}, {"nproc_per_node": 2, "gpus": 1}, {"nnodes": 2}):
        with pytest.raises(ValueError):
            Experiment.model_validate({**base, "distributed": bad})


def test_torchruns_failure_summary_in_one_line():
    log = """loadbench: failed on rank 1: ValueError: boom
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
loadbench.bench.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-22_09:58:45
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 27531)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 27531
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_09:58:45
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 27532)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""
    assert failure_summary(log) == (
        "torchrun: rank 1 (local_rank: 1) failed first, exit code 1: ValueError: boom; "
        "1 other rank(s) failed or were stopped"
    )
    assert failure_summary("no summary here") is None


# -- `torchrun -m loadbench train`: the real thing, two ranks, gloo -------------------------------
# One test per torchrun launch: pytest-xdist would start a module fixture once per worker.


def test_torchrun_trains_disjoint_halves_into_identical_replicas(tmp_path):
    store = loadbench.convert(loadbench.load_source(TINY), "npy", tmp_path / "store")
    (tmp_path / "indices").mkdir()
    done = torchrun("train", store.path, "--epochs", "2", "--out", tmp_path / "run", *TRAIN,
                    env={DEBUG_INDICES: str(tmp_path / "indices")})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    # each rank trained on a disjoint half of every epoch, a new order each epoch
    seen = {}
    for rank in (0, 1):
        with open(tmp_path / "indices" / f"rank-{rank}.jsonl") as f:
            for line in f:
                entry = json.loads(line)
                if entry["epoch"] >= 1:  # epoch 0: the sanity check's first batch
                    seen[rank, entry["epoch"]] = entry["indices"]
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for epoch in (1, 2):
        a, b = seen[0, epoch], seen[1, epoch]
        assert len(a) == len(b) == 48 and not set(a) & set(b)
        assert sorted(a + b) == list(range(96))
    assert seen[0, 1] != seen[0, 2]

    # the ranks ended with identical weights, and model.pt (rank 0's) is that model
    assert_one_model(tmp_path / "run", "gloo", test_images=32)

    # every epoch records both ranks; the checkpoint its world size
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]
    for record in state["history"]:
        ranks = record["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["images"] == 48 for r in ranks)
        assert record["time_s"] == max(r["time_s"] for r in ranks)
        assert record["images_per_s"] == pytest.approx(96 / record["time_s"])
        assert record["straggler_ratio"] >= 1.0

    # rank 0 alone prints: one line per epoch, one summary
    assert done.stderr.count("epoch 1/2") == 1 and done.stdout.count("run directory") == 1


def test_resume_under_another_world_size_is_one_clear_error(tmp_path):
    """The world size is checked first thing on resume: a run directory as a 2-rank run leaves
    it (its config, a checkpoint with `world_size: 2`) is enough, resumed in one process."""
    from loadbench.training.config import TrainConfig

    store = loadbench.convert(loadbench.load_source(TINY), "npy", tmp_path / "store")
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(data=store.path, epochs=1, out=str(out), widths="4,8", device="cpu")
    (out / "config.yaml").write_text(config.to_yaml())
    torch.save({"epoch": 1, "world_size": 2}, out / "checkpoint.pt")
    done = subprocess.run(
        [sys.executable, "-m", "loadbench", "train", "--resume", str(out), "--epochs", "2"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "trained with world size 2 and this run has world size 1" in done.stderr
    assert "torchrun --nproc-per-node 2" in done.stderr and "Traceback" not in done.stderr


# -- the benchmark under torchrun -----------------------------------------------------------------


def _experiment(path, **overrides) -> str:
    values = {
        "name": "ddp", "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy"],
        "epochs": 2, "repeats": 1, "batch_size": 16, "device": "cpu",
        "train": {"widths": "4,8"}, "distributed": {"nproc_per_node": 2}, **overrides,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _kill_first_rank(rank: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first benchmark worker of torchrun rank `rank` under this process."""
    me = psutil.Process()
    while not stop.is_set():
        for p in me.children(recursive=True):
            try:
                if "loadbench.bench.worker" in p.cmdline() and p.environ().get("RANK") == rank:
                    p.kill()
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue
        stop.wait(0.05)


def test_bench_under_torchrun_records_every_rank_and_survives_a_dying_rank(tmp_path):
    """Two repeats under torchrun; rank 1 of the first is killed."""
    exp = load_experiment(_experiment(tmp_path / "exp.yaml", repeats=2))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_rank, args=("1", stop, killed), daemon=True)
    killer.start()
    try:
        outcome = run_experiment(exp, tmp_path / "results", tmp_path / "stores")
    finally:
        stop.set()
        killer.join()
    assert killed, "no rank 1 was found to kill"

    # the killed run fails with torchrun's summary; the next run goes on
    assert (outcome.ok, outcome.failed) == (1, 1)
    failed, ok = read_runs(tmp_path / "results")
    assert failed["status"] == "failed" and failed["repeat"] == 0
    assert failed["error"].startswith("torchrun: rank 1 (local_rank: 1) failed first")
    assert "SIGKILL" in failed["error"]
    assert ok["status"] == "ok" and ok["repeat"] == 1

    # the run that finished records every rank
    assert ok["world_size"] == 2 and ok["settings"]["distributed"]["nproc_per_node"] == 2
    assert 0 <= ok["final"]["accuracy"] <= 1
    for epoch in ok["epochs"]:
        ranks = epoch["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["images"] == 48 for r in ranks)
        assert all(r["peak_rss_bytes"] > 50e6 and r["cpu_pct_mean"] is not None for r in ranks)
        assert epoch["straggler_ratio"] >= 1 and epoch["images_per_s"] > 0

    # the report shows the spread of the ranks, and the failure
    built, _ = write_report(str(tmp_path / "results"), str(tmp_path / "report"), ("md",))
    table = built.sections[0].table
    assert {"ranks", "straggler", "img/s per rank"} <= set(table.columns)
    row = table.rows[0]
    assert row[1].endswith("/ddp2") and row[table.columns.index("ranks")] == "2"
    assert row[table.columns.index("straggler")].endswith("x")
    assert len(row[table.columns.index("img/s per rank")].split(" / ")) == 2
    assert any("straggler" in note for note in table.notes)
    assert built.failed is not None and "torchrun: rank 1" in built.failed.rows[0][1]


def test_loader_only_runs_under_torchrun_read_half_each(tmp_path):
    path = _experiment(tmp_path / "exp.yaml", mode="loader-only", access=["batch"])
    outcome = run_experiment(load_experiment(path), tmp_path / "r", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (1, 0), outcome.failures
    (record,) = read_runs(tmp_path / "r")
    assert record["world_size"] == 2 and "final" not in record
    for epoch in record["epochs"]:
        assert [r["images"] for r in epoch["ranks"]] == [48, 48]
        assert epoch["images_per_s"] == pytest.approx(96 / epoch["time_s"])


@pytest.mark.parametrize(
    "backend,device,message",
    [("mpi", "cpu", "use nccl or gloo"), ("nccl", "cpu", "nccl needs --device cuda")],
)
def test_a_ddp_backend_that_cannot_work_is_one_clear_error(monkeypatch, backend, device, message):
    from loadbench.training import distributed

    monkeypatch.setattr(distributed, "_current", None)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "LOADBENCH_DDP_BACKEND": backend}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LoadbenchError, match=message):
        distributed.setup(torch.device(device))
