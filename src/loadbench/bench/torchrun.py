"""Benchmark runs under torchrun, for experiments with `distributed: {nproc_per_node: N}`.

Each run is `python -m torch.distributed.run --nnodes M --nproc-per-node N [--standalone]
-m loadbench.bench.worker SPEC RESULT`: torchrun starts the ranks, every rank runs the worker
(training or loader-only on its shard), and rank 0 writes RESULT. When a rank dies or raises,
torchrun stops the others and exits non-zero with a `ChildFailedError` summary (which rank
failed first, its exit code); the run is recorded as failed with that summary.

More than one node (`nnodes > 1`) rendezvouses through torchrun's c10d backend at
LOADBENCH_RDZV_ENDPOINT (host:port), with the run's key as the rendezvous id: the same
`loadbench bench` runs on every node, and the node where rank 0 lands records the run. That path
is not tested here (one machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess

from loadbench.bench.experiment import Distributed
from loadbench.bench.launch import FreshInterpreters
from loadbench.bench.records import RunRecord
from loadbench.errors import LoadbenchError

RANK_FAILED = "loadbench: failed on rank"  # a rank's error line in torchrun's log (worker.py)

RDZV_ENDPOINT = "LOADBENCH_RDZV_ENDPOINT"
STOP_GRACE_S = 15  # torchrun's own shutdown of its ranks after SIGTERM, before SIGKILL


def torchrun_args(distributed: Distributed, run_id: str) -> list[str]:
    """torchrun's options for one run (`run_id` names the rendezvous of a multi-node run)."""
    args = ["--nnodes", str(distributed.nnodes), "--nproc-per-node",
            str(distributed.nproc_per_node)]  # fmt: skip
    if distributed.nnodes == 1:
        return [*args, "--standalone"]
    endpoint = os.environ.get(RDZV_ENDPOINT)
    if not endpoint:
        raise LoadbenchError(
            f"distributed.nnodes {distributed.nnodes} needs a rendezvous: set {RDZV_ENDPOINT}="
            "host:port (a port open on one of the nodes) and run the same `loadbench bench` on "
            "every node"
        )
    return [*args, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]


class Torchrun(FreshInterpreters):
    """Launches each run under torchrun (exit code non-zero when a rank failed, None after a
    timeout), as the runner's other launchers do."""

    def __init__(self, python: str, distributed: Distributed):
        super().__init__(python)
        self.distributed = distributed
        torchrun_args(distributed, "check")  # a missing rendezvous is said before any run

    def command(self, spec_file: str, result_file: str) -> list[str]:
        run_id = os.path.basename(spec_file).removesuffix(".json")  # the run's key
        return [self.python, "-m", "torch.distributed.run",
                *torchrun_args(self.distributed, run_id),
                "-m", "loadbench.bench.worker", spec_file, result_file]  # fmt: skip

    def stop(self, process: subprocess.Popen) -> None:
        stop(process)  # the ranks are in sessions of their own


def stop(process: subprocess.Popen) -> None:
    """Stop torchrun and its ranks. torchrun starts each rank in a session of its own, out of
    reach of a signal to torchrun's group: it is asked to stop them (SIGTERM), and whatever is
    left after a grace period is killed."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)
    for p in [*tree, process]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # a rank and its DataLoader workers
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            p.kill()
    process.wait()


def failure_summary(log: str) -> str | None:
    """torchrun's `ChildFailedError` summary in one line: the rank that failed first, its exit
    code, the error it printed (see worker.RANK_FAILED), and how many other ranks failed."""
    head, found, cause = log.rpartition("Root Cause (first observed failure):")
    if not found:
        return None
    fields = dict(re.findall(r"^\s*(rank|exitcode|traceback)\s*:\s*(.*?)\s*$", cause, re.M))
    rank = fields.get("rank", "?")
    code = re.sub(r"\s*\(pid: \d+\)", "", fields.get("exitcode", "?"))
    text = f"torchrun: rank {rank} failed first, exit code {code}"
    number = rank.split()[0]
    said = re.findall(rf"^{re.escape(RANK_FAILED)} {re.escape(number)}: (.*)$", head, re.M)
    if said:
        text += f": {said[-1]}"
    elif fields.get("traceback", "").startswith("Signal"):
        text += f" ({fields['traceback']})"
    others = head.rpartition("Failures:")[2]
    count = len(re.findall(r"^\[\d+\]:", others, re.M))
    if count:
        text += f"; {count} other rank(s) failed or were stopped"
    return text


def settle(record: RunRecord, returncode: int | None, log: str, wrote_result: bool,
           nnodes: int) -> RunRecord | None:  # fmt: skip
    """A distributed run's record from what rank 0 wrote and how torchrun ended: failed with
    torchrun's summary when torchrun failed (rank 0's own error, if it wrote one, after it).
    None: a multi-node run whose rank 0 was on another node (that node records it)."""
    if returncode == 0:
        if not wrote_result and nnodes > 1:
            return None
        return record
    if returncode is None:  # timed out; the log's tail is only torchrun's reaction to SIGTERM
        record.error = str(record.error or "timed out").partition(": ")[0]
        return record
    summary = failure_summary(log) or f"torchrun exited with code {returncode}"
    if wrote_result and record.status == "failed" and record.error:
        summary += f"; rank 0: {record.error}"
    record.status, record.error = "failed", summary
    return record
