"""A results directory and the record of one run in it.

The directory holds `bench.json` (its schema), `env.json` (machine and versions),
`experiment.yaml` (the last experiment run into it) and `runs.jsonl`: one `RunRecord` per
finished run, appended and fsynced when the run ends. `RESULTS_SCHEMA` versions all of it: the
records, their settings (and so the run keys) and the marker.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def read_runs(results_dir: str) -> list[dict[str, Any]]:
    """Every record of runs.jsonl, as the file holds it; a line cut short by a crash is
    ignored."""
    path = os.path.join(results_dir, RUNS)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of a process killed while writing
    return records


def latest_records(results_dir: str) -> tuple[list[RunRecord], int]:
    """The last record of every run key, typed (a run tried again is recorded again), and how
    many lines are not records this version can read (they are left out)."""
    latest: dict[str, dict[str, Any]] = {}
    unreadable = 0
    for data in read_runs(results_dir):
        if isinstance(data, dict) and isinstance(data.get("key"), str):
            latest[data["key"]] = data
        else:
            unreadable += 1
    records = []
    for data in latest.values():
        try:
            records.append(RunRecord.model_validate(data))
        except ValidationError:
            unreadable += 1
    return records, unreadable


def append_run(results_dir: str, record: RunRecord) -> None:
    """One line, written in one call and fsynced: a crash loses at most this record."""
    line = json.dumps(record.to_json(), allow_nan=False) + "\n"
    with open(os.path.join(results_dir, RUNS), "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
