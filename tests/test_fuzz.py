"""Every reader meets damaged stores: truncated files, flipped bits, swapped and overwritten byte
ranges, a hostile manifest. Each damaged store is opened, read whole and verified in a child
process (`fuzz_worker.py`), and the outcome must be a LoadbenchError of one line, or a verify
FAIL, or a PASS with exactly the pristine store's data: never a signal, a hang, another
exception, or wrong data called good.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import loadbench
from loadbench.formats import format_names, get_format, peer_names

# Every format and every installed peer with its defaults, and the options that put other
# decoders (PNG, JPEG, compressed chunks, a zip) in front of the damage.
VARIANTS = [(name, {}) for name in format_names()]
VARIANTS += [(name, {}) for name in peer_names() if get_format(name).missing() is None]
VARIANTS += [
    ("webdataset", {"encoding": "png"}), ("tfrecord", {"encoding": "jpeg"}),
    ("hdf5", {"compression": "gzip"}), ("zarr", {"compression": "blosc-zstd", "store": "zip"}),
]  # fmt: skip
IDS = [name + "".join(f"-{v}" for v in options.values()) for name, options in VARIANTS]
SOURCE = "synthetic:cifar-like?count=6&eval_count=3&size=8&classes=3"
BATCH = 12  # damaged stores per child process
TIMEOUT_S = 30  # per store: a read of a tiny store that takes longer hangs
WORKER = Path(__file__).with_name("fuzz_worker.py")


# -- the damage ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One change to one file of a store; positions are fractions of the file's size."""

    kind: str  # flip, truncate, swap, overwrite, or json (a manifest value replaced)
    file: int  # index into the store's sorted files (modulo their number)
    at: float = 0.0
    to: float = 0.0
    bits: tuple[int, ...] = ()
    data: bytes = b""
    value: object = None

    def apply(self, root: Path) -> str:
        """Damage the store at `root`; returns what was done, for a failure's message."""
        if self.kind == "json":
            return _edit_manifest(root / "manifest.json", self.file, self.value)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        path = files[self.file % len(files)]
        data = bytearray(path.read_bytes())
        where = int(self.at * len(data))
        if self.kind == "truncate":
            data = data[:where]
        elif self.kind == "flip" and data:
            for k, bit in enumerate(self.bits):
                data[(where + 97 * k) % len(data)] ^= 1 << bit
        elif self.kind == "swap" and data:
            other, n = int(self.to * len(data)), len(self.data) or 1
            a, b = sorted((where, other))
            n = min(n, b - a, len(data) - b)
            data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
        elif self.kind == "overwrite":
            data[where : where + len(self.data)] = self.data
        path.write_bytes(bytes(data))
        return f"{self.kind} {path.relative_to(root)} at {where} ({self!r})"


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key in sorted(node):
            yield from _leaves(node[key], (*path, key))
    elif isinstance(node, list) and node:
        for k, item in enumerate(node):
            yield from _leaves(item, (*path, k))
    else:
        yield path


def _edit_manifest(path: Path, pick: int, value) -> str:
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError:
        return "manifest not JSON any more: left as it is"
    leaves = list(_leaves(manifest))
    where = leaves[pick % len(leaves)]
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path.write_text(json.dumps(manifest))
    return f"manifest {'.'.join(map(str, where))} = {value!r}"


FRACTION = st.integers(0, 1 << 16).map(lambda n: n / ((1 << 16) + 1))
FILE = st.integers(0, 1 << 20)
HOSTILE = st.sampled_from(
    [0, -1, 1, 3, 2**31, 2**63, 1e308, -0.5, "", "x", "../x", "uint8", "png", None, [], {}, [0],
     True]
)  # fmt: skip
MUTATION = st.one_of(
    st.builds(Mutation, st.just("flip"), FILE, FRACTION,
              bits=st.lists(st.integers(0, 7), min_size=1, max_size=4).map(tuple)),
    st.builds(Mutation, st.just("truncate"), FILE, FRACTION),
    st.builds(Mutation, st.just("swap"), FILE, FRACTION, FRACTION,
              data=st.binary(min_size=1, max_size=64)),
    st.builds(Mutation, st.just("overwrite"), FILE, FRACTION,
              data=st.binary(min_size=1, max_size=16)),
    st.builds(Mutation, st.just("json"), FILE, value=HOSTILE),
)  # fmt: skip
PLANS = st.lists(st.lists(MUTATION, min_size=1, max_size=3), min_size=BATCH, max_size=BATCH)


# -- the pristine stores and the worker ---------------------------------------------------------


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """A function: variant -> (store path, npz of its data), each converted once."""
    root = tmp_path_factory.mktemp("pristine")
    source = loadbench.load_source(SOURCE)
    made: dict[str, tuple[Path, Path]] = {}

    def make(ident: str, name: str, options: dict) -> tuple[Path, Path]:
        if ident not in made:
            store = loadbench.convert(source, name, root / ident, **options)
            _settle(root / ident)
            arrays = {}
            for split in store.splits:
                images, labels = store.raw(split).read_batch(np.arange(store.counts[split]))
                arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
            store.close()
            np.savez(root / f"{ident}.npz", **arrays)
            made[ident] = (root / ident, root / f"{ident}.npz")
        return made[ident]

    return make


# What a conversion writes differently on every run (times, a random fingerprint, zip member
# dates, and the heap's leftovers that LMDB writes into the free space of its pages), given fixed
# values so that a damage plan meets the same bytes on every run: the test is deterministic.
SETTLED = [
    ("*/state.json", rb'"_fingerprint": "[0-9a-f]+"', b'"_fingerprint": "0000000000000000"'),
    ("*/index.json", rb'"updated_at": "[0-9.]+"', b'"updated_at": "0"'),
]


def _settle(root: Path) -> None:
    for pattern, found, fixed in SETTLED:
        for path in root.glob(pattern):
            path.write_bytes(re.sub(found, fixed, path.read_bytes()))
    for path in root.glob("*.zip"):
        with zipfile.ZipFile(path) as z:
            members = [(info, z.read(info)) for info in z.infolist()]
        with zipfile.ZipFile(path, "w", allowZip64=True) as z:
            for info, data in members:
                info.date_time = (1980, 1, 1, 0, 0, 0)
                z.writestr(info, data)
    for path in root.glob("*.lmdb"):
        _clear_lmdb_free_space(path)
    manifest = json.loads((root / "manifest.json").read_bytes())
    manifest.update(created="2000-01-01T00:00:00+00:00", convert_time_s=0.0, total_time_s=0.0)
    sizes = {rel: (root / rel).stat().st_size for rel in manifest["files"]}
    manifest["bytes"] += sum(sizes.values()) - sum(manifest["files"].values())
    manifest["files"] = sizes
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _clear_lmdb_free_space(path: Path, page: int = 4096) -> None:
    """Zero the unused bytes between the node pointers and the nodes of LMDB's (0.9) branch and
    leaf pages: page header = pgno u64, pad u16, flags u16, lower u16, upper u16."""
    data = bytearray(path.read_bytes())
    start = 0
    while start < len(data):
        flags, lower, upper = struct.unpack_from("<HHH", data, start + 10)
        if flags & 0x03 and 16 <= lower <= upper <= page:  # P_BRANCH | P_LEAF
            data[start + lower : start + upper] = bytes(upper - lower)
        overflow = struct.unpack_from("<I", data, start + 12)[0] if flags & 0x04 else 1
        start += page * max(overflow, 1)  # an overflow value's pages have one header
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def fuzz_worker():
    proc = subprocess.Popen(
        [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert json.loads(_reply(proc, 120)) == {"ready": True}
    yield proc
    proc.stdin.close()
    proc.wait(30)


def _reply(proc, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"the fuzz worker said nothing for {timeout_s} s"
    line = proc.stdout.readline()
    assert line, f"the fuzz worker died (exit status {proc.poll()})"
    return line


# -- running a batch ----------------------------------------------------------------------------


def run_batch(worker, store: Path, expected: Path, plans) -> None:
    """Damage a copy of `store` per plan, check all copies in one child, judge each outcome."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        tmp = Path(tmp)
        done = {}
        for k, plan in enumerate(plans):
            copy = tmp / f"{k:03d}"
            shutil.copytree(store, copy)
            done[str(copy)] = "; ".join(m.apply(copy) for m in plan)
        request = {
            "stores": list(done), "expected": {path: str(expected) for path in done},
            "result": str(tmp / "results.jsonl"), "log": str(tmp / "child.log"),
            "timeout_s": TIMEOUT_S,
        }  # fmt: skip
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        status = json.loads(_reply(worker, TIMEOUT_S * (len(plans) + 1)))["status"]
        lines = [json.loads(line) for line in (tmp / "results.jsonl").read_text().splitlines()]
        log = (tmp / "child.log").read_text(errors="replace")[-3000:]
    results = [r for r in lines if "start" not in r]
    for result in results:
        problem = judge(result)
        assert problem is None, f"{problem}\ndamage: {done[result['path']]}\n{log}"
    if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
        culprit = lines[-1].get("start", "?")
        name = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else "exit"
        pytest.fail(f"the reader died ({name}, status {status}) on a store damaged by: "
                    f"{done.get(culprit, '?')}\n{log}")  # fmt: skip


def judge(result: dict) -> str | None:
    """What is wrong with one damaged store's outcome, or None."""
    for step in ("read", "verify"):
        if result[step] == "crash":
            return f"{step} raised a non-loadbench exception:\n{result[f'{step}_message']}"
        if "\n" in result[f"{step}_message"].rstrip("\n"):
            return f"{step} error of more than one line: {result[f'{step}_message']!r}"
    if result["verify"] == "pass" and result["read"] == "ok" and not result["equal"]:
        return "verify PASSED a store whose data differs from the original"
    if result["verify"] == "pass" and result["read"] == "error":
        return f"verify PASSED a store that cannot be read: {result['read_message']}"
    return None


FUZZ_SETTINGS = {
    "deadline": None, "phases": (Phase.explicit, Phase.generate),  # no shrinking: each batch
    "suppress_health_check": list(HealthCheck),  # names its culprit
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@settings(max_examples=45, derandomize=True, database=None, **FUZZ_SETTINGS)
@given(plans=PLANS)
def test_a_damaged_store_fails_cleanly(pristine, fuzz_worker, variant, plans):
    name, options = variant
    run_batch(fuzz_worker, *pristine(IDS[VARIANTS.index(variant)], name, options), plans)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@settings(max_examples=150, **FUZZ_SETTINGS)
@given(plans=PLANS)
def test_many_damaged_stores_fail_cleanly(pristine, fuzz_worker, variant, plans):
    name, options = variant
    run_batch(fuzz_worker, *pristine(IDS[VARIANTS.index(variant)], name, options), plans)
