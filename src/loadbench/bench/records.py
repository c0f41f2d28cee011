"""A results directory and the record of one run in it.

The directory holds `bench.json` (its schema), `env.json` (machine and versions),
`experiment.yaml` (the last experiment run into it) and `runs.jsonl`: one `RunRecord` per
finished run, appended and fsynced when the run ends. `RESULTS_SCHEMA` versions all of it: the
records, their settings (and so the run keys) and the marker. While a bench runs, it holds
`bench.lock` there (`lock.py`).

What runs.jsonl guarantees: a record is one line written in one call, then fsynced. A crash
while writing leaves at most a torn last line: readers leave it out and say which line, and
the next bench (holding the lock) cuts it off, so its run runs again once; a write that fails
(a full disk) is cut back off at once. A damaged line never hides the records around it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loadbench.errors import writing
from loadbench.util import clean, now_iso

RESULTS_SCHEMA = 1
RUNS = "runs.jsonl"
MARKER = "bench.json"


class RunRecord(BaseModel):
    """What one run recorded: its configuration, then (when it got that far) its setup, one
    entry per epoch, the final evaluation and how it ended. Written by the run's own process
    (or by the runner, for a run that died or never started) and read by the report.

    Fields a record of an older loadbench lacks take their defaults; keys this version does
    not know are kept.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: int | None = Field(None, alias="schema")
    key: str
    status: str = "running"  # running | ok | failed
    experiment: str | None = None
    dataset: str | None = None  # the dataset's label in reports
    source: str | None = None
    format: str | None = None
    dtype: str | None = None
    access: str | None = None
    workers: int | None = None
    cache: str = "warm"
    shuffle: str = "exact"
    storage: str = "local"  # "local", or the label of an object storage
    mode: str | None = None
    batch_size: int | None = None
    epochs_planned: int | None = None
    repeat: int | None = None
    seed: int | None = None
    settings: dict[str, Any] = {}  # what the run key hashes (with the repeat)
    store_path: str = ""
    store: dict[str, Any] = {}  # the store's size, images and conversion time
    started: str | None = None
    pid: int | None = None
    eviction: dict[str, Any] | None = None  # cold runs: what was evicted, and whether it worked
    world_size: int | None = None
    # The cores the run's loader may use (its workers or threads, at least 1, at most the
    # cores it can run on: `util.cpu_budget`), and whether its format is a peer loader.
    cpu_budget: int | None = None
    peer: bool | None = None
    epoch_order: str | None = None  # "exact" (loadbench's), or "own": a peer library's shuffle
    # What trained the model: torch or keras, eager or compiled (torch.compile, tf.function) or
    # xla; None for loader-only runs (no model) and records from before they were dimensions.
    framework: str | None = None
    graph: str | None = None
    setup: dict[str, Any] | None = None
    plan: str | None = None
    order_quality: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] | None = None
    final: dict[str, Any] | None = None
    time_to_first_batch_s: float | None = None
    total_time_s: float | None = None
    cuda_max_allocated_bytes: int | None = None
    sampler: dict[str, Any] | None = None
    device: str | None = None
    finished: str | None = None
    error: str | None = None
    traceback: str | None = None
    wall_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as `runs.jsonl` holds it: the fields that were set, strict JSON."""
        return clean(self.model_dump(by_alias=True, exclude_unset=True))

    def fail(self, error: str, **more: Any) -> RunRecord:
        """This record, marked failed with `error` (and `more` fields), finished now."""
        for name, value in {"status": "failed", "error": error, "finished": now_iso(),
                            **more}.items():  # fmt: skip
            setattr(self, name, value)
        return self


def steady_epochs(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs of a run the study compares: every one after the first (a cold start apart),
    or the only one. The report's numbers and adaptive repeats' stopping rule both use these."""
    return epochs[1:] or epochs


@dataclass
class RunsFile:
    """runs.jsonl as read: its records with their line numbers, and what is wrong with the
    lines that are not (line number -> why)."""

    records: list[tuple[int, Any]] = field(default_factory=list)
    problems: dict[int, str] = field(default_factory=dict)
    torn_at: int | None = None  # byte offset of a last line cut short, without its newline


TORN = "cut short (a bench was killed while writing it, or is writing it now)"


def scan_runs(results_dir: str) -> RunsFile:
    """Read runs.jsonl line by line, keeping what each line that is not a record is."""
    found = RunsFile()
    try:
        with open(os.path.join(results_dir, RUNS), "rb") as f:
            lines = f.read().split(b"\n")  # the last item is b"" when the file ends in \n
    except FileNotFoundError:
        return found
    offset = 0
    for number, raw in enumerate(lines, 1):
        last = number == len(lines)
        if raw.strip():
            data, problem = _parse(raw.decode("utf-8", errors="replace"))
            if data is not None:
                found.records.append((number, data))
            if problem:
                found.problems[number] = TORN if last and data is None else problem
            if last and data is None:
                found.torn_at = offset
        offset += len(raw) + 1
    return found


def _parse(line: str) -> tuple[Any, str | None]:
    """A line's record, and what is wrong with it. Earlier versions appended a record onto
    the half line a crash had left: that record is found and kept."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    start = line.find("{", 1)
    while start > 0:
        with contextlib.suppress(json.JSONDecodeError):
            data, end = decoder.raw_decode(line, start)
            if end == len(line.rstrip()) and isinstance(data, dict) and "key" in data:
                return data, "a record cut short, then a whole record (kept) on the same line"
        start = line.find("{", start + 1)
    return None, "not JSON"


def read_runs(results_dir: str) -> list[Any]:
    """Every record of runs.jsonl, as the file holds it; lines that are not JSON (a line cut
    short by a crash) are left out: see `scan_runs` for which."""
    return [data for _, data in scan_runs(results_dir).records]


class RecordedOk:
    """The keys of the runs recorded as finished ok in runs.jsonl, kept current by reading only
    the lines appended since the last look: a bench looks before and after every run, and an
    experiment's runs.jsonl grows to thousands of records."""

    def __init__(self, results_dir: str):
        self.results_dir = results_dir
        self.path = os.path.join(results_dir, RUNS)
        self.keys: set[str] = set()
        self.read_up_to = 0  # bytes of whole lines read

    def current(self) -> set[str]:
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            size = 0
        if size < self.read_up_to:  # cut since (a torn line healed): read it all again
            self.keys, self.read_up_to = set(), 0
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.read_up_to)
            new = f.read(size - self.read_up_to)
            whole = new.rfind(b"\n") + 1  # a line being written now is read next time
            for raw in new[:whole].split(b"\n"):
                if not raw.strip():
                    continue
                data, _ = _parse(raw.decode("utf-8", errors="replace"))
                ok = isinstance(data, dict) and data.get("status") == "ok"
                if ok and isinstance(data.get("key"), str):
                    self.keys.add(data["key"])
            self.read_up_to += whole
        return self.keys


def latest_records(results_dir: str) -> tuple[list[RunRecord], list[str]]:
    """The last record of every run key, typed (a run tried again is recorded again), and the
    lines left out or damaged, each said as "line N (why)"."""
    runs = scan_runs(results_dir)
    problems = dict(runs.problems)
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for number, data in runs.records:
        if isinstance(data, dict) and isinstance(data.get("key"), str):
            latest[data["key"]] = (number, data)
        else:
            problems[number] = "not a run record"
    records = []
    for number, data in latest.values():
        try:
            records.append(RunRecord.model_validate(data))
        except ValidationError as e:
            where = ".".join(map(str, e.errors()[0]["loc"]))
            problems[number] = f"not a record this version reads: {where} is invalid"
    return records, [f"line {n} ({why})" for n, why in sorted(problems.items())]


def heal_runs(results_dir: str) -> str | None:
    """Cut off a last line that a crash left half-written, so that the next record starts on
    a line of its own, and the run it was runs again. Only for the holder of the results
    directory's lock (`lock.py`): a bench writing that line right now looks the same.
    Returns a note saying what was cut."""
    runs = scan_runs(results_dir)
    if runs.torn_at is None:
        return None
    path = os.path.join(results_dir, RUNS)
    with writing(path, "repairing"):
        os.truncate(path, runs.torn_at)
    return (
        f"{path}: line {max(runs.problems)} was cut short by a crash while it was written; "
        "removed (its run runs again)"
    )


def append_run(results_dir: str, record: RunRecord) -> None:
    """One line, written in one call and fsynced: a crash loses at most this record. The line
    starts after a newline even if the file's last line lacks one, and a write that fails (a
    full disk) is cut back off, so no half line is left behind."""
    path = os.path.join(results_dir, RUNS)
    line = (json.dumps(record.to_json(), allow_nan=False) + "\n").encode()
    with writing(path, "recording a run in"):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
