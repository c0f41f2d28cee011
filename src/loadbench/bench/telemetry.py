"""A background sampler of what a run costs: memory, CPU, disk reads and the GPU.

Every `period_s` it walks the process tree (the run and its DataLoader workers) with psutil and
records the summed RSS, CPU time and bytes read from storage, plus system CPU and, when a GPU is
there, NVML utilisation and memory. Counters of processes that have exited (workers of a finished
epoch) stay counted: the last value seen of every pid is kept. `window()` returns the aggregate
since the previous call, so the training loop can cut it per epoch. The sampler times its own
work (`busy_s`), which is how its overhead is reported.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass
class _Window:
    started: float
    rss: list[int] = field(default_factory=list)
    cpu_pct: list[float] = field(default_factory=list)
    system_cpu_pct: list[float] = field(default_factory=list)
    gpu_util_pct: list[float] = field(default_factory=list)
    gpu_mem: list[int] = field(default_factory=list)
    processes_max: int = 0
    busy_s: float = 0.0


class Gpu:
    """NVML readings of one device, or nothing when there is no NVML or no GPU."""

    def __init__(self, index: int = 0, enabled: bool = True):
        self.handle = None
        self.name = None
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
            self.name = pynvml.nvmlDeviceGetName(self.handle)
            if isinstance(self.name, bytes):
                self.name = self.name.decode()
        except Exception:  # no package, no driver, no device: telemetry without GPU columns
            self.handle = None

    def read(self) -> tuple[float, int] | None:
        if self.handle is None:
            return None
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
        return float(util), int(memory)


class Sampler:
    """Samples the process tree rooted at `pid` (default: this process) in a daemon thread."""

    def __init__(self, period_s: float = 0.2, pid: int | None = None, gpu: bool = True,
                 gpu_index: int = 0):  # fmt: skip
        self.period_s = period_s
        self.root = psutil.Process(pid)
        self.gpu = Gpu(gpu_index, enabled=gpu)  # a DDP rank reads its own GPU
        self._processes: dict[int, psutil.Process] = {}
        self._seen_cpu: dict[int, float] = {}  # pid -> last cpu seconds (user + system)
        self._seen_read: dict[int, int] = {}  # pid -> last bytes read from storage
        self._lock = threading.Lock()
        self._window = _Window(time.perf_counter())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadbench-sampler", daemon=True)
        self._last = (time.perf_counter(), self._cpu_seconds())
        self._window_start_cpu = self._last[1]
        self._window_start_read = self._read_bytes()
        psutil.cpu_percent(None)  # prime the system counter

    # -- readings ------------------------------------------------------------------------------
    def _tree(self) -> list[psutil.Process]:
        pids = _descendants(self.root.pid)
        if pids is None:  # no /proc/PID/task/TID/children here: psutil scans every process
            try:
                return [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return [self.root]
        processes = [self.root]
        for pid in pids:
            process = self._processes.get(pid)
            if process is None:
                try:
                    process = self._processes[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
            processes.append(process)
        return processes

    def _cpu_seconds(self, processes=None) -> float:
        for p in processes or self._tree():
            try:
                times = p.cpu_times()
                self._seen_cpu[p.pid] = times.user + times.system
            except psutil.Error:
                pass
        return sum(self._seen_cpu.values())

    def _read_bytes(self, processes=None) -> int:
        for p in processes or self._tree():
            with contextlib.suppress(psutil.Error, AttributeError):
                self._seen_read[p.pid] = p.io_counters().read_bytes
        return sum(self._seen_read.values())

    def sample(self) -> None:
        """Take one sample now (the thread calls this every period)."""
        started = time.perf_counter()
        processes = self._tree()
        rss = 0
        for p in processes:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        cpu = self._cpu_seconds(processes)
        self._read_bytes(processes)
        now = time.perf_counter()
        last_time, last_cpu = self._last
        self._last = (now, cpu)
        gpu = self.gpu.read()
        system = psutil.cpu_percent(None)
        with self._lock:
            w = self._window
            w.rss.append(rss)
            if now > last_time:
                w.cpu_pct.append(100.0 * (cpu - last_cpu) / (now - last_time))
            w.system_cpu_pct.append(system)
            w.processes_max = max(w.processes_max, len(processes))
            if gpu is not None:
                w.gpu_util_pct.append(gpu[0])
                w.gpu_mem.append(gpu[1])
            w.busy_s += time.perf_counter() - started

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    # -- control -------------------------------------------------------------------------------
    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self) -> dict[str, Any]:
        """Aggregates since the previous window (or the start), and a new window begins."""
        self.sample()  # a reading at the boundary: short windows still get one
        with self._lock:
            w, self._window = self._window, _Window(time.perf_counter())
        cpu_now, read_now = sum(self._seen_cpu.values()), sum(self._seen_read.values())
        elapsed = time.perf_counter() - w.started
        stats: dict[str, Any] = {
            "window_s": elapsed,
            "peak_rss_bytes": max(w.rss) if w.rss else None,
            "mean_rss_bytes": sum(w.rss) / len(w.rss) if w.rss else None,
            "cpu_pct_mean": 100.0 * (cpu_now - self._window_start_cpu) / elapsed
            if elapsed
            else None,
            "cpu_pct_max": max(w.cpu_pct) if w.cpu_pct else None,
            "system_cpu_pct_mean": _mean(w.system_cpu_pct),
            "system_cpu_pct_max": max(w.system_cpu_pct) if w.system_cpu_pct else None,
            "read_bytes": read_now - self._window_start_read,
            "processes_max": w.processes_max,
            "samples": len(w.rss),
            "sampler_busy_s": w.busy_s,
            "gpu_util_pct_mean": _mean(w.gpu_util_pct),
            "gpu_util_pct_max": max(w.gpu_util_pct) if w.gpu_util_pct else None,
            "gpu_mem_used_bytes_max": max(w.gpu_mem) if w.gpu_mem else None,
        }
        self._window_start_cpu, self._window_start_read = cpu_now, read_now
        return stats


def _descendants(pid: int) -> list[int] | None:
    """Child pids, recursively, from /proc/PID/task/TID/children: about 50x cheaper than
    psutil's scan of every process, which keeps the sampler under 1% of a core. None where the
    kernel does not offer the file."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            if current == pid:
                return None
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as f:
                    kids = [int(k) for k in f.read().split()]
            except FileNotFoundError:
                if current == pid:
                    return None
                continue
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
