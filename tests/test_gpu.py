"""The CUDA paths, on a GPU machine: `make test-gpu` (scripts/device.sh runs it on the lent GPU).

Every test here is marked `gpu` (left out of `make test`) and skips, saying why, where torch sees
no CUDA device. They cover training on cuda in each access mode and with AMP, the `tensor`
format's read onto the GPU (CuPy + DLPack), pinned host memory through the DataLoader and the
worker ring, GPU telemetry of benchmark runs, and DDP over NCCL where there are two GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

import loadbench
from ddp_checks import assert_one_model, torchrun
from loadbench.training.augment import Augmenter, build_augment
from loadbench.training.batches import make_batches, shutdown
from loadbench.training.config import TrainConfig
from loadbench.training.loop import Run
from loadbench.training.order import EpochOrder
from loadbench.training.train import train

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs CUDA, and torch sees no GPU here: run `make test-gpu` on a GPU machine "
        "(scripts/device.sh)",
    ),
]
TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs; this machine has fewer"
)

SOURCE = "synthetic:cifar-like?count=160&eval_count=48&size=16&classes=4&seed=3"
TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"
FAST = {"widths": "8,16", "batch_size": 32}
# Float32 results of the GPU differ from the CPU's in the last bits (TF32 convolutions, other
# kernels); after one epoch of 5 steps the losses agree to well within this.
LOSS_RTOL = 0.05


@pytest.fixture(scope="module")
def gpu_stores(tmp_path_factory):
    """160 train + 48 test 16x16 RGB images of 4 classes, as npy and tensor stores."""
    source = loadbench.load_source(SOURCE)
    root = tmp_path_factory.mktemp("gpu-stores")
    made = {}
    for fmt, dtype in [("npy", "uint8"), ("tensor", "uint8"), ("tensor", "float16")]:
        made[fmt, dtype] = loadbench.convert(source, fmt, root / f"{fmt}-{dtype}", dtype)
    return made


def config(store, out, **overrides) -> TrainConfig:
    return TrainConfig(**{"data": store.path, "epochs": 1, "out": str(out), **FAST, **overrides})


@pytest.fixture(scope="module")
def cpu_reference(gpu_stores, tmp_path_factory):
    """The same one-epoch run on the CPU (every access mode learns the same there)."""
    out = tmp_path_factory.mktemp("cpu-reference") / "run"
    return train(config(gpu_stores["npy", "uint8"], out, device="cpu", access="batch"))


def epoch_batches(store, access, workers, device, pin_memory=False, augmenter=None):
    """Every batch of epoch 2 of the train split, kept all at once."""
    labels = loadbench.open_store(store.path, device="cpu").raw("train").labels()
    order = EpochOrder(np.arange(len(labels)), labels, seed=5)
    order.set_epoch(2)
    batches = make_batches(
        store, "train", order, access=access, batch_size=16, workers=workers,
        pin_memory=pin_memory, device=torch.device(device), augmenter=augmenter,
    )  # fmt: skip
    try:
        return list(batches)
    finally:
        shutdown(batches)


# -- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,access,workers",
    [("npy", "sample", 0), ("npy", "batch", 0), ("npy", "device", 0), ("npy", "sample", 2),
     ("tensor", "batch", 0), ("tensor", "device", 0), ("tensor", "batch", 2)],
)  # fmt: skip
def test_one_epoch_on_cuda_in_each_access_mode(gpu_stores, cpu_reference, tmp_path, fmt, access,
                                               workers):  # fmt: skip
    out = tmp_path / "run"
    cfg = config(gpu_stores[fmt, "uint8"], out, device=DEVICE, access=access, workers=workers)
    result = train(cfg)
    (record,) = result.history
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    assert 0 <= record["test_accuracy"] <= 1 and record["images"] == 160
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    assert result.metrics["device"].startswith("cuda")
    # pinned host memory is the default with CUDA, except where batches never leave the device
    assert yaml.safe_load((out / "config.yaml").read_text())["pin_memory"] is (access != "device")
    # what it learns is what the CPU learns, up to float differences
    (reference,) = cpu_reference.history
    assert record["train_loss"] == pytest.approx(reference["train_loss"], rel=LOSS_RTOL)
    assert record["test_loss"] == pytest.approx(reference["test_loss"], rel=LOSS_RTOL)


def test_amp_runs_the_model_in_float16_on_cuda(gpu_stores, tmp_path):
    cfg = config(gpu_stores["npy", "uint8"], tmp_path / "run", device=DEVICE, amp=True,
                 access="device", batch_norm=True)  # fmt: skip
    with Run(cfg) as run:
        assert run.amp_dtype == torch.float16 and run.scaler.is_enabled()
        run.train_order.set_epoch(1)
        images, _ = next(iter(run.train_batches))
        assert images.is_cuda and images.dtype == torch.float32
        with run.autocast():
            logits = run.forward(images)
        assert logits.dtype == torch.float16
    result = train(cfg)
    (record,) = result.history
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    assert 0 <= record["test_accuracy"] <= 1
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights


def test_the_cli_trains_and_resumes_on_cuda_with_amp(gpu_stores, tmp_path):
    out = tmp_path / "run"
    common = ["--device", "cuda", "--amp", "--widths", "8,16", "--batch-size", "32", "--access",
              "batch", "--workers", "2"]  # fmt: skip

    def cli(*args):
        done = subprocess.run(
            [sys.executable, "-m", "loadbench", "train", *map(str, args)], capture_output=True,
            text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    cli(gpu_stores["npy", "uint8"].path, "--epochs", "1", "--out", out, *common)
    cli("--resume", out, "--epochs", "2")  # the optimizer and scaler state back onto the GPU
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cuda" and metrics["epochs_run"] == 2
    assert math.isfinite(metrics["test"]["loss"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["amp"] is True and saved["device"] == "cuda" and saved["pin_memory"] is True
    blob = torch.load(out / "model.pt", weights_only=True)  # loads where there is no GPU
    assert all(t.device.type == "cpu" for t in blob["state_dict"].values())


# -- the tensor format on the GPU -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_the_tensor_format_reads_onto_cuda_what_the_cpu_reads(gpu_stores, dtype):
    path = gpu_stores["tensor", dtype].path
    on_gpu = loadbench.open_store(path, device=DEVICE).new_reader("train")
    on_cpu = loadbench.open_store(path, device="cpu").new_reader("train")
    assert on_gpu.handle["device"].type == "cuda" and on_cpu.handle["device"].type == "cpu"
    indices = np.random.default_rng(0).permutation(160)[:50]
    images, labels = on_gpu.read_batch_tensor(indices)
    assert images.is_cuda and labels.is_cuda
    assert images.dtype == torch.float32 and images.shape == (50, 3, 16, 16)
    expected, expected_labels = on_cpu.read_batch_tensor(indices)
    torch.testing.assert_close(images.cpu(), expected, rtol=0, atol=1e-6)  # x/255 on each
    assert labels.cpu().tolist() == expected_labels.tolist()
    drawn_there = torch.as_tensor(indices, device=on_gpu.handle["device"])  # used as it is
    again, again_labels = on_gpu.read_batch_tensor(drawn_there)
    torch.testing.assert_close(again, images, rtol=0, atol=0)
    assert torch.equal(again_labels, labels)
    stored, stored_labels = on_gpu.read_batch(indices)  # the stored pixels, exactly
    cpu_stored, cpu_stored_labels = on_cpu.read_batch(indices)
    np.testing.assert_array_equal(stored, cpu_stored)
    np.testing.assert_array_equal(stored_labels, cpu_stored_labels)
    np.testing.assert_array_equal(on_gpu.labels(), on_cpu.labels())


def test_the_tensor_format_loads_through_cupy_without_a_copy(gpu_stores):
    cupy = pytest.importorskip("cupy", reason="no CuPy: the tensor format copies through torch")
    from loadbench.formats.tensor import load_resident

    path = os.path.join(gpu_stores["tensor", "uint8"].path, "train_images.npy")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    images = load_resident(path, DEVICE)
    assert images.is_cuda and images.dtype == torch.uint8 and images.shape == (160, 16, 16, 3)
    assert torch.cuda.memory_allocated() - before < images.nbytes  # CuPy's memory, not torch's
    assert cupy.from_dlpack(images).data.ptr == images.data_ptr()  # one buffer, shared
    np.testing.assert_array_equal(images.cpu().numpy(), np.load(path))


@pytest.mark.parametrize("fmt", ["npy", "tensor"])
@pytest.mark.parametrize("augment", [False, True])
def test_device_access_on_cuda_gives_the_cpus_batches(gpu_stores, fmt, augment):
    store = gpu_stores[fmt, "uint8"]
    augmenter = None
    if augment:
        augmenter = Augmenter(build_augment(["flip", "crop"], store.image_shape), None, seed=1)
    on_gpu = epoch_batches(store, "device", 0, DEVICE, augmenter=augmenter)
    on_cpu = epoch_batches(store, "device", 0, "cpu", augmenter=augmenter)
    assert [len(y) for _, y in on_gpu] == [16] * 10
    for (x, y), (cx, cy) in zip(on_gpu, on_cpu, strict=True):
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and x.is_contiguous()
        torch.testing.assert_close(x.cpu(), cx, rtol=0, atol=1e-6)
        assert y.tolist() == cy.tolist()


# -- pinned host memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("access,workers", [("sample", 0), ("batch", 0), ("sample", 2),
                                            ("batch", 2)])  # fmt: skip
def test_pinned_batches_are_pinned_and_equal_to_plain_ones(gpu_stores, access, workers):
    store = gpu_stores["npy", "uint8"]
    pinned = epoch_batches(store, access, workers, DEVICE, pin_memory=True)
    plain = epoch_batches(store, access, 0, "cpu")
    assert len(pinned) == len(plain) == 10
    moved = []
    for (x, y), (px, py) in zip(pinned, plain, strict=True):
        assert x.is_pinned() and y.is_pinned() and not x.is_cuda
        torch.testing.assert_close(x, px, rtol=0, atol=0)
        assert y.tolist() == py.tolist()
        moved.append(x.to(DEVICE, non_blocking=True))  # an asynchronous copy from pinned memory
    torch.cuda.synchronize()
    torch.testing.assert_close(torch.cat(moved).cpu(), torch.cat([x for x, _ in plain]))


# -- telemetry and the benchmark ------------------------------------------------------------------


def test_the_sampler_reads_the_gpu():
    from loadbench.bench.env import gpu_info
    from loadbench.bench.telemetry import Gpu, Sampler

    gpu = Gpu(torch.cuda.current_device())
    assert gpu.name and gpu.read() is not None
    assert gpu_info() and gpu_info()[0]["memory_bytes"] > 0
    with Sampler(0.02) as sampler:
        sampler.window()
        x = torch.ones(256 << 20, dtype=torch.uint8, device=DEVICE)  # 256 MiB
        for _ in range(200):
            x.add_(1)
        torch.cuda.synchronize()
        stats = sampler.window()
    assert stats["gpu_util_pct_mean"] is not None and stats["gpu_util_pct_max"] >= 0
    assert stats["gpu_mem_used_bytes_max"] >= 256 << 20


@pytest.mark.parametrize("fresh", [False, True])
def test_a_loader_only_bench_on_cuda_records_gpu_telemetry(tmp_path, fresh):
    from loadbench.bench.experiment import Experiment
    from loadbench.bench.records import read_runs
    from loadbench.bench.runner import run_experiment

    exp = Experiment.model_validate({
        "name": "gpu", "mode": "loader-only", "device": "cuda", "epochs": 2, "repeats": 1,
        "batch_size": 32, "datasets": [{"source": TINY, "name": "tiny"}],
        "formats": ["npy", "tensor"], "access": ["batch", "device"], "sample_period_s": 0.05,
        "fresh_interpreter": fresh,
    })  # fmt: skip
    outcome = run_experiment(exp, tmp_path / "r", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (4, 0), outcome.failures
    records = read_runs(tmp_path / "r")
    assert len(records) == 4
    for r in records:
        assert r["status"] == "ok" and r["device"].startswith("cuda")
        assert r.get("cuda_max_allocated_bytes") is not None
        assert [e["epoch"] for e in r["epochs"]] == [1, 2]
        for e in r["epochs"]:
            assert e["images"] == 96 and e["images_per_s"] > 0 and e["compute_s"] == 0
            assert e["gpu_util_pct_mean"] is not None and e["gpu_mem_used_bytes_max"] > 0
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["torch_cuda"] and env["gpus"] and env["gpus"][0]["memory_bytes"] > 0


def test_a_training_bench_run_on_cuda(tmp_path):
    from loadbench.bench.experiment import Experiment
    from loadbench.bench.records import read_runs
    from loadbench.bench.runner import run_experiment

    exp = Experiment.model_validate({
        "name": "gpu-train", "device": "cuda", "epochs": 1, "repeats": 1, "batch_size": 32,
        "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy"],
        "access": ["batch"], "workers": [2], "train": {"widths": "4,8", "amp": True},
    })  # fmt: skip
    outcome = run_experiment(exp, tmp_path / "r", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (1, 0), outcome.failures
    (r,) = read_runs(tmp_path / "r")
    assert r["device"].startswith("cuda") and (r.get("cuda_max_allocated_bytes") or 0) > 0
    assert 0 <= r["final"]["accuracy"] <= 1
    (epoch,) = r["epochs"]
    assert epoch["compute_s"] > 0 and math.isfinite(epoch["train_loss"])
    assert epoch["gpu_util_pct_mean"] is not None and epoch["gpu_mem_used_bytes_max"] > 0


# -- timing, memory, compile ----------------------------------------------------------------------


def gpu_sleep_cycles(seconds: float) -> int:
    """Cycles of `torch.cuda._sleep` that keep this GPU busy for about `seconds`."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return int(seconds / (start.elapsed_time(end) / 1000 / 10_000_000))


@pytest.mark.parametrize("timing", ["overlap", "sync"])
def test_cuda_events_attribute_stall_and_compute_and_see_their_overlap(gpu_stores, monkeypatch,
                                                                       timing):  # fmt: skip
    """A loader that sleeps on the host shows as stall, a model that keeps the GPU busy as
    compute; under overlap timing the host loads while the GPU computes, so the epoch takes
    less than stall + compute, and under sync timing it takes their sum."""
    store, step_s, batches = gpu_stores["npy", "uint8"], 0.02, 10
    reader_class = type(store.new_reader("train"))
    read_into = reader_class.read_batch_into  # what `batch` access reads a batch with

    def slow_read(self, indices, out):
        time.sleep(step_s)
        return read_into(self, indices, out)

    monkeypatch.setattr(reader_class, "read_batch_into", slow_read)
    cycles = gpu_sleep_cycles(step_s)
    cfg = TrainConfig(data=store.path, model="cnn-tiny", access="batch", workers=0,
                      batch_size=160 // batches, epochs=1, device=DEVICE,
                      timing=timing)  # fmt: skip
    with Run(cfg, store, out_dir=None) as run:
        forward = run.forward

        def busy_forward(images):
            torch.cuda._sleep(cycles)
            return forward(images)

        run.forward = busy_forward
        epoch = run.train_epoch(1)
    stall, compute = epoch["data_wait_s"], epoch["compute_s"]
    assert stall >= batches * step_s
    assert compute >= 0.8 * batches * step_s  # the GPU's busy time, seen by the events
    assert 0 < epoch["au"] <= 1 and epoch["timing"] == timing
    if timing == "overlap":
        assert epoch["time_s"] < 0.8 * (stall + compute)
    else:
        assert epoch["time_s"] >= 0.95 * (stall + compute)


def test_nvml_memory_agrees_with_nvidia_smi_and_covers_torchs_peak():
    from loadbench.bench.telemetry import Gpu

    gpu = Gpu(torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)  # 1 GiB
    torch.cuda.synchronize()
    nvml = gpu.read()[1]
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
         f"--id={torch.cuda.current_device()}"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert abs(nvml - int(smi.strip()) * 2**20) < 64 * 2**20  # the same reading, MiB apart
    assert nvml >= torch.cuda.max_memory_allocated() >= 1 << 30  # + the context and the cache
    del x


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="torch.compile on CUDA "
                    "needs triton, which is not installed here")  # fmt: skip
def test_torch_compile_trains_on_cuda(gpu_stores, tmp_path):
    result = train(config(gpu_stores["npy", "uint8"], tmp_path / "run", device=DEVICE,
                          compile=True, access="device"))  # fmt: skip
    assert result.metrics["compile_time_s"] > 0
    assert math.isfinite(result.history[0]["train_loss"])


@pytest.mark.parametrize("fresh", [False, True])
def test_a_ceilings_bench_on_cuda_names_the_bound(tmp_path, fresh):
    from loadbench.bench.experiment import Experiment
    from loadbench.bench.runner import run_experiment
    from loadbench.report.bounds import bounds_table
    from loadbench.report.data import load_results

    exp = Experiment.model_validate({
        "name": "gpu-ceilings", "device": "cuda", "epochs": 2, "repeats": 1, "batch_size": 32,
        "datasets": [{"source": TINY, "name": "tiny"}], "formats": ["npy"], "ceilings": True,
        "access": ["batch"], "workers": [2], "train": {"widths": "4,8"},
        "fresh_interpreter": fresh,
    })  # fmt: skip
    outcome = run_experiment(exp, tmp_path / "r", tmp_path / "stores")
    assert (outcome.ok, outcome.failed) == (3, 0), outcome.failures
    results = load_results(tmp_path / "r")
    train_run = results.runs.iloc[0]
    assert train_run["timing"] == "overlap" and 0 < train_run["au"] <= 1
    table = bounds_table(results, "tiny")
    assert table is not None and table.rows[0][-1].split(":")[0] in ("data-bound", "compute-bound")


# -- DDP over NCCL, or Gloo on CUDA tensors -------------------------------------------------------


def train_two_ranks_on_cuda(tmp_path, epochs: int, env=None) -> None:
    store = loadbench.convert(loadbench.load_source(TINY), "npy", tmp_path / "store")
    done = torchrun("train", store.path, "--epochs", epochs, "--out", tmp_path / "run",
                    "--widths", "4,8", "--batch-norm", "--batch-size", "16", "--device", "cuda",
                    env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@TWO_GPUS
def test_torchrun_trains_on_two_gpus_over_nccl(tmp_path):
    train_two_ranks_on_cuda(tmp_path, epochs=2)
    assert_one_model(tmp_path / "run", "nccl", test_images=32)


def test_torchrun_trains_on_cuda_over_gloo(tmp_path):
    """Two ranks over Gloo on CUDA tensors: DDP on a machine with one GPU."""
    train_two_ranks_on_cuda(tmp_path, epochs=1, env={"LOADBENCH_DDP_BACKEND": "gloo"})
    assert_one_model(tmp_path / "run", "gloo", test_images=32)


# -- last: a mistake here would be a device-side assert, which ends every later CUDA call --------


def test_an_index_out_of_range_is_an_index_error_not_a_device_assert(gpu_stores):
    reader = loadbench.open_store(gpu_stores["tensor", "uint8"].path, device=DEVICE)
    reader = reader.new_reader("train")
    with pytest.raises(IndexError, match="out of range"):
        reader.read_batch_tensor([0, 160])
    with pytest.raises(IndexError, match="out of range"):
        reader.read_batch([-161])
    images, labels = reader.read_batch_tensor([-1])  # counts from the end, as NumPy does
    assert images.is_cuda and labels.tolist() == [int(reader.labels()[-1])]
    assert torch.ones(1, device=DEVICE).item() == 1.0  # the GPU still works
