"""The process `test_fuzz.py` runs damaged stores in: it imports loadbench and every format's
library once, then forks a child per batch of stores, so that a segfault or a hang kills a child
(and is reported), never the tests, and no batch pays the imports (seconds) again.

Protocol, one JSON object per line: worker -> test `{"ready": true}`; test -> worker
`{"stores": [PATH...], "expected": {PATH: NPZ}, "result": PATH, "log": PATH, "timeout_s": N}`;
worker -> test `{"status": WAITSTATUS}` when the child is done. The child appends to `result`
`{"start": PATH}` before each store and the store's outcome after it, so a child that dies
names the store it died on.

    python tests/fuzz_worker.py
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def preload() -> None:
    """Import what reading any store imports, without starting threads or touching data."""
    import contextlib
    import importlib

    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    import loadbench.formats
    import loadbench.store  # noqa: F401
    import loadbench.verify  # noqa: F401

    loadbench.formats.list_formats(peers=True)
    for module in ("torchvision.io", "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "h5py", "zarr",
                   "lmdb", "webdataset", "tfrecord", "crc32c", "datasets", "litdata",
                   "array_record.python.array_record_module", "nvidia.dali",
                   "nvidia.dali.plugin.pytorch", "spdl.io", "spdl.pipeline", "grain",
                   "streaming", "ffcv"):  # fmt: skip
        with contextlib.suppress(ImportError):  # a peer that is not installed is not fuzzed
            importlib.import_module(module)


def read_all(path: str) -> dict:
    """Every split's images and labels, read as a user would: open, labels, one batch."""
    import numpy as np

    from loadbench.store import open_store

    store = open_store(path)
    try:
        out = {}
        for split in store.splits:
            reader = store.raw(split)
            images, labels = reader.read_batch(np.arange(store.counts[split]))
            out[split] = (np.asarray(images), np.asarray(labels), np.asarray(reader.labels()))
        return out
    finally:
        store.close()


def same_data(got: dict, expected_npz: str) -> bool:
    import numpy as np

    with np.load(expected_npz) as expected:
        splits = {key.rpartition("_")[0] for key in expected.files}
        if set(got) != splits:
            return False
        for split, (images, labels, all_labels) in got.items():
            want_images, want_labels = expected[f"{split}_images"], expected[f"{split}_labels"]
            if images.dtype != want_images.dtype or not np.array_equal(images, want_images):
                return False
            if not (np.array_equal(labels, want_labels) and np.array_equal(all_labels, labels)):
                return False
    return True


def outcome(step) -> tuple[str, str, object]:
    """("ok", "", value), ("error", message, None) for a LoadbenchError, or ("crash",
    traceback, None) for any other exception."""
    from loadbench.errors import LoadbenchError

    try:
        return "ok", "", step()
    except LoadbenchError as e:
        return "error", str(e), None
    except Exception:
        return "crash", traceback.format_exc(), None


def check_store(path: str, expected_npz: str) -> dict:
    from loadbench.verify import verify_path

    read, read_message, data = outcome(lambda: read_all(path))
    equal = None
    if read == "ok":
        equal = same_data(data, expected_npz)
    verify, verify_message, checks = outcome(lambda: verify_path(path))
    if verify == "ok":
        verify = "pass" if all(c.passed for c in checks) else "fail"
        verify_message = " | ".join(p for c in checks for p in c.problems)
    return {"path": path, "read": read, "read_message": read_message, "equal": equal,
            "verify": verify, "verify_message": verify_message}  # fmt: skip


def child(request: dict) -> None:
    """Check the batch's stores one by one, then exit; never returns."""
    code = 0
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        with open(request["result"], "a") as out:
            for path in request["stores"]:
                out.write(json.dumps({"start": path}) + "\n")
                out.flush()
                signal.alarm(request["timeout_s"])  # SIGALRM's default action ends a hang
                result = check_store(path, request["expected"][path])
                out.write(json.dumps(result) + "\n")
                out.flush()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def serve() -> None:
    from loadbench.util import die_with_parent

    die_with_parent()
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    serve()
