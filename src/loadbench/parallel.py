"""Worker processes for `convert --jobs N`: tasks run in forked workers, results come back in
task order.

Workers are forked, not spawned. A forked worker starts in about 0.05 s; a spawned or
forkserver one imports torch again and takes 1.5-5 s (measured on 2 cores), which is more than a
whole conversion of 20,000 small images saves. A forked worker also inherits the source as it
is (arrays in memory, a folder's file list, a generator's parameters) without pickling it or
reading it again. The pool is forked before any progress bar starts, so no thread of ours runs
at the fork; zarr and torch reset their own threads in a forked child.

Tasks and results are small (ranges, manifest parts): bulk data is read by the worker itself and
written to files. A failed task fails the whole run: the workers are terminated and the error
is raised in the parent. Ctrl-C reaches the parent only (workers ignore SIGINT), which then
terminates the workers; a worker whose parent has died exits within a second.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from loadbench.errors import LoadbenchError
from loadbench.util import die_with_parent

Report = Callable[[int], None]  # a worker's `report(n)`: n more images done


def available() -> bool:
    """Whether this platform can fork workers (not on Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


class Workers:
    """`jobs` forked processes that run `run(task, report)` for the tasks they are given.

    Use as a context manager: leaving it stops the workers, and terminates them when leaving on
    an exception (a failed task, Ctrl-C).
    """

    def __init__(self, jobs: int, run: Callable[[Any, Report], Any]):
        context = multiprocessing.get_context("fork")
        self._tasks = context.Queue()
        self._results = context.Queue()
        args = (run, self._tasks, self._results, os.getpid())
        self._processes = [
            context.Process(target=_serve, args=args, name=f"loadbench-worker-{k}", daemon=True)
            for k in range(jobs)
        ]
        try:
            for process in self._processes:
                process.start()
        except BaseException:  # e.g. out of memory for the next fork: end the ones started
            self._processes = [p for p in self._processes if p.pid is not None]
            self.stop(terminate=True)
            raise

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.stop(terminate=kind is not None)

    def ordered(self, tasks: list[Any], advance: Report, window: int) -> Iterator[tuple[Any, Any]]:
        """(task, result) in the order of `tasks`; no task is handed out more than `window`
        places ahead of the one the caller waits for, so results do not pile up.
        `advance(n)` is called as workers report progress."""
        done: dict[int, Any] = {}
        sent = 0
        for number, task in enumerate(tasks):
            while sent < min(len(tasks), number + window):
                self._tasks.put((sent, tasks[sent]))
                sent += 1
            while number not in done:
                message = self._next()
                if message[0] == "progress":
                    advance(message[1])
                elif message[0] == "done":
                    done[message[1]] = message[2]
                else:
                    _, failed, text, trace = message
                    error = LoadbenchError(f"{tasks[failed]} failed in a worker process: {text}")
                    error.add_note(f"the worker's traceback:\n{trace}")
                    raise error
            yield task, done.pop(number)

    def _next(self) -> tuple:
        while True:
            try:
                return self._results.get(timeout=0.5)
            except queue.Empty:
                for process in self._processes:
                    code = process.exitcode
                    if code is not None:
                        how = f"was killed by signal {-code}" if code < 0 else f"exited ({code})"
                        oom = " (out of memory?)" if code == -signal.SIGKILL else ""
                        raise LoadbenchError(
                            f"a worker process (pid {process.pid}) {how} before its tasks were "
                            f"done{oom}"
                        ) from None

    def stop(self, terminate: bool = False) -> None:
        """Let the workers finish and exit; or, with `terminate`, end them now."""
        if not terminate:
            for _ in self._processes:
                self._tasks.put(None)
        for process in self._processes:
            if terminate:
                process.terminate()
            process.join(timeout=None if terminate else 30)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (self._tasks, self._results):
            channel.cancel_join_thread()  # never block on a pipe whose reader is gone
            channel.close()


def _serve(run: Callable[[Any, Report], Any], tasks, results, parent: int) -> None:
    """A worker's loop: run tasks until told to stop, or until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _end_with(parent)

    def report(n: int) -> None:
        results.put(("progress", n))

    while True:
        try:
            item = tasks.get(timeout=1)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if item is None:
            return
        number, task = item
        try:
            results.put(("done", number, run(task, report)))
        except BaseException as e:  # reported, then wait to be terminated
            text = str(e) if isinstance(e, LoadbenchError) else f"{type(e).__name__}: {e}"
            results.put(("error", number, text, traceback.format_exc()))


def _end_with(parent: int) -> None:
    """On Linux, have the kernel end this worker when its parent ends, however it ends (a
    busy worker would otherwise write on into a store nobody will finish). Elsewhere the idle
    check in `_serve` remains."""
    if die_with_parent() and os.getppid() != parent:  # the parent ended before it was asked
        os._exit(1)
