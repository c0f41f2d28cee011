"""How the runner starts a run's process: forked from a template that imported everything once
(`Template`, the default), or a fresh interpreter per run (`FreshInterpreters`); torchrun's
launcher (`bench/torchrun.py`) is a fresh interpreter that starts the ranks.

Every launcher has `run(spec_file, result_file, log_file, timeout)`, which returns the run's exit
code (negative: killed by that signal) or None after a timeout, and `close()`. A run is in a
session (process group) of its own, so a timeout or Ctrl-C stops it with everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.util import die_with_parent


class FreshInterpreters:
    """Each run in a new `python -m loadbench.bench.worker` (pays the imports every time)."""

    def __init__(self, python: str):
        self.python = python

    def command(self, spec_file: str, result_file: str) -> list[str]:
        return [self.python, "-m", "loadbench.bench.worker", spec_file, result_file]

    def stop(self, process: subprocess.Popen) -> None:
        """Stop a run and everything it started (it is in a session of its own)."""
        kill_group(process.pid)
        process.wait()

    def run(self, spec_file: str, result_file: str, log_file: str, timeout: float) -> int | None:
        """Exit code (negative: killed by that signal), or None after a timeout."""
        with open(log_file, "wb") as log:
            process = subprocess.Popen(
                self.command(spec_file, result_file), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
            try:
                return process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop(process)
                return None
            except BaseException:  # Ctrl-C: the run is in its own session and would go on
                self.stop(process)
                raise

    def close(self) -> None:
        pass


class Template:
    """Runs forked from a template process that has imported everything once (zygote.py)."""

    def __init__(self, python: str):
        self.process = subprocess.Popen(
            [python, "-m", "loadbench.bench.zygote"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        if self._read(timeout=300).get("ready") is not True:
            raise LoadbenchError("the benchmark's template process did not start")

    def _read(self, timeout: float | None) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise LoadbenchError("the benchmark's template process died")
        return json.loads(line)

    def run(self, spec_file: str, result_file: str, log_file: str, timeout: float) -> int | None:
        request = {"spec": spec_file, "result": result_file, "log": log_file}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._read(timeout=60)["pid"]
        try:
            status = self._read(timeout=timeout)["status"]
        except TimeoutError:
            kill_group(pid)
            self._read(timeout=60)
            return None
        except BaseException:  # Ctrl-C: stop the run too, it is in its own session
            kill_group(pid)
            raise
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def kill_group(pid: int) -> None:
    """SIGKILL a run's process group: the run and its DataLoader workers."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
