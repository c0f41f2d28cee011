"""A template process that forks one child per benchmark run.

Importing torch and what a run needs costs seconds (torch, its compiler front-end that the
optimizers pull in, scikit-learn), several times the epoch of a small benchmark. The template
imports them once and then does nothing else: no tensor is made, no thread pool is started, CUDA
is not touched. Each run is a child forked from it, with its own process group and log, so a run
starts from the same clean state as a fresh interpreter, without paying for the imports again,
and nothing of one run (caches, allocator state, open files, CUDA context) reaches the next
(multiprocessing's forkserver works the same way). `fresh_interpreter: true` in an experiment
uses a new `python -m loadbench.bench.worker` per run instead.

Protocol on stdin/stdout, one JSON object per line:
  template -> runner: {"ready": true}
  runner -> template: {"spec": PATH, "result": PATH, "log": PATH}
  template -> runner: {"pid": PID} when the child starts, {"pid": PID, "status": WAITSTATUS} when
  it ends.
"""

from __future__ import annotations

import json
import os
import sys

from loadbench.util import die_with_parent


def preload() -> None:
    """Import (only import) everything a run uses."""
    import numpy  # noqa: F401
    import psutil  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it on the first optimizer)
    import torch.utils.data  # noqa: F401

    import loadbench.bench.pagecache  # noqa: F401
    import loadbench.bench.telemetry  # noqa: F401
    import loadbench.bench.worker  # noqa: F401
    import loadbench.formats
    import loadbench.store  # noqa: F401
    import loadbench.training.loaders  # noqa: F401
    import loadbench.training.loop  # noqa: F401
    import loadbench.training.nets  # noqa: F401
    import loadbench.training.resident  # noqa: F401

    loadbench.formats.list_formats()  # the format modules; their libraries load lazily
    del torch


def serve() -> None:
    die_with_parent()
    preload()
    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)  # never returns
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"pid": pid, "status": status})


def child(request: dict) -> None:
    os.setsid()  # its own process group: a timeout kills the run and its DataLoader workers
    die_with_parent()
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    from loadbench import progress

    # The template's console was made for the runner's terminal; the run writes to its log.
    progress.console = progress.make_console(stderr=True)
    code = 1
    try:
        from loadbench.bench.worker import main

        code = main([request["spec"], request["result"]])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve()
