"""The result card (`report/card.json`): everything needed to check or reproduce a results
directory's numbers, in one strict-JSON file: the machine and software that measured them, the
datasets and a hash of exactly what was stored, the protocol (seeds, cache, repeats, epochs,
timing), and per dataset the configurations ranked by median epoch time with 95% intervals.

Cards are what two runs of a study are compared by (`loadbench report A --compare B`): do
they rank the configurations the same way, and where not, is the flip larger than the noise?
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from loadbench.bench.records import RUNS, RunRecord, latest_records
from loadbench.errors import LoadbenchError
from loadbench.report.data import CONFIG, Results, planned_repeats, warm_only
from loadbench.report.tables import Table, aggregate, config_name
from loadbench.util import now_iso, write_json_atomic

CARD = "card.json"
# Bumped when a field changes meaning or goes; a card of another schema is rebuilt from records.
CARD_SCHEMA = 1
STATISTIC = (
    "per run, its steady-state epoch time (the median of its epochs after the first; the one "
    "epoch when it ran one); per configuration, the median of that over its repeats, with a "
    "95% percentile-bootstrap interval (2000 resamples, seed 0); warm-cache runs when there "
    "are any"
)
HASHES = {
    "identity": "sha256 (24 hex digits) of what the store was made from: the source's identity "
    "(kind, path or preset, source options), the format and its on-disk version, the dtype and "
    "the format options; the same identity means the same recipe",
    "images_sha256": "sha256 of a split's images as the store's readers decode them (stored "
    "dtype, little-endian, in store order): the same hash means the same pixels, whatever the "
    "format; lossy formats and other dtypes hash differently",
    "labels_sha256": "sha256 of the split's labels as int64, in store order",
    "content": "the dataset's own pixels and labels: the split hashes of a lossless uint8 "
    "store of it (every such store, whatever its format, holds the same)",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # a newer card's fields are kept


class Machine(_Model):
    cpu: str | None = None
    cores_logical: int | None = None
    cores_physical: int | None = None
    ram_bytes: int | None = None
    gpus: list[dict[str, Any]] = []
    os: str | None = None
    stores_filesystem: dict[str, Any] | None = None


class Software(_Model):
    loadbench: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None  # uncommitted changes to tracked files; None: not recorded
    python: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None
    numpy: str | None = None
    libraries: dict[str, str | None] = {}  # pip name -> version, None: not installed


class SplitHash(_Model):
    count: int
    images_sha256: str
    labels_sha256: str


class StoreCard(_Model):
    format: str | None
    dtype: str | None
    storage: str = "local"
    identity: str | None = None
    created: str | None = None
    path: str | None = None
    bytes: int | None = None
    lossy: bool | None = None
    splits: dict[str, SplitHash] | None = None  # from the manifest; None: not readable here
    why_no_hashes: str | None = None


class DatasetCard(_Model):
    source: str | None = None
    limit: int | None = None
    options: dict[str, Any] = {}
    image_shape: list[int] | None = None
    images: dict[str, int] = {}  # split -> images
    source_identity: dict[str, Any] | None = None  # what makes two loads the same data
    content: dict[str, SplitHash] | None = None  # the dataset's pixels (see HASHES)
    stores: list[StoreCard] = []


class RepeatSeed(_Model):
    repeat: int  # from 1, as reports count
    seed: int


class Protocol(_Model):
    mode: str | None = None
    epochs: list[int] = []  # epochs per run (each distinct value recorded)
    batch_size: list[int] = []
    device_requested: list[str] = []
    device_used: list[str] = []
    timing: list[str] = []  # overlap | sync (runs without a model: none)
    cache: list[str] = []  # cache states run
    repeats_planned: str | None = None  # "10", or the adaptive rule in words
    repeats_min: int = 0  # finished repeats of the configuration with fewest
    repeats_max: int = 0
    seed: int | None = None  # the experiment's; repeat k runs with seed + k - 1
    repeat_seeds: list[RepeatSeed] = []


class Ranked(_Model):
    rank: int
    configuration: str
    median_epoch_s: float | None
    ci95_low_s: float | None  # None: fewer than two repeats
    ci95_high_s: float | None
    repeats: int


class Ranking(_Model):
    cache: str | None  # the cache state(s) of the runs ranked
    configurations: list[Ranked]


class ResultCard(_Model):
    card_schema: int = CARD_SCHEMA
    results: str
    runs_sha256: str | None  # of runs.jsonl: which records the card was made from
    generated: str
    experiment_name: str | None = None
    machine: Machine
    software: Software
    datasets: dict[str, DatasetCard]
    protocol: Protocol
    statistic: str = STATISTIC
    rankings: dict[str, Ranking]
    hashes: dict[str, str] = HASHES
    experiment: dict[str, Any] = {}  # experiment.yaml: the resolved configuration
    notes: list[str] = []  # what the card could not say, and why


# -- building ------------------------------------------------------------------------------------


def build_card(results: Results) -> ResultCard:
    """The card of a results directory (the ranked runs' records, and the stores' manifests
    where the stores are on this machine)."""
    keys = set(results.runs["key"])
    records = [r for r in latest_records(results.path)[0] if r.key in keys]
    env, notes = results.env, []
    if not env:
        notes.append("env.json is missing: machine and software are unknown")
    elif "libraries" not in env:
        notes.append("library versions were not recorded (env.json of an older loadbench)")
    datasets = {ds: _dataset([r for r in records if r.dataset == ds]) for ds in results.datasets}
    for name, dataset in datasets.items():
        notes += [f"{name} {s.format}/{s.dtype}: no content hash: {s.why_no_hashes}"
                  for s in dataset.stores if s.why_no_hashes]  # fmt: skip
    return ResultCard(
        results=results.path, runs_sha256=runs_digest(results.path), generated=now_iso(),
        experiment_name=results.experiment.get("name"), machine=_pick(Machine, env),
        software=_pick(Software, env), datasets=datasets, protocol=_protocol(results, records),
        rankings={ds: rank(results, ds) for ds in results.datasets},
        experiment=results.experiment, notes=notes,
    )  # fmt: skip


def _pick(model: type[_Model], env: dict[str, Any]) -> Any:
    """`model`'s fields from env.json (what it lacks takes the default)."""
    return model.model_validate({k: env[k] for k in model.model_fields if env.get(k) is not None})


def runs_digest(results_dir: str) -> str | None:
    try:
        with open(os.path.join(results_dir, RUNS), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _dataset(records: list[RunRecord]) -> DatasetCard:
    """A dataset as its runs recorded it, with each store's content hashes."""
    first = records[0]
    spec = first.settings.get("dataset") or {}
    stores: dict[tuple, tuple[StoreCard, Any]] = {}
    for r in records:
        if (r.format, r.dtype, r.storage) not in stores:
            stores[r.format, r.dtype, r.storage] = _store(r)
    manifest = next((m for _, m in stores.values() if m is not None), None)
    exact = [
        c.splits for c, _ in stores.values() if c.splits and c.dtype == "uint8" and not c.lossy
    ]
    return DatasetCard(
        source=spec.get("source", first.source), limit=spec.get("limit"),
        options=spec.get("options") or {}, image_shape=first.store.get("image_shape"),
        images=first.store.get("images") or {},
        source_identity=manifest.source.get("identity") if manifest else None,
        content=exact[0] if exact else None,
        stores=[card for card, _ in stores.values()],
    )  # fmt: skip


def _store(r: RunRecord) -> tuple[StoreCard, Any]:
    """The store a run read, with its splits' content hashes from its manifest, and that
    manifest (None when it cannot be read here)."""
    info = r.store
    manifest, why = _manifest(r.store_path, info.get("identity"))
    splits = None
    if manifest is not None:
        splits = {name: SplitHash(count=s.count, images_sha256=s.images_sha256,
                                  labels_sha256=s.labels_sha256)
                  for name, s in manifest.splits.items()}  # fmt: skip
    card = StoreCard(
        format=r.format, dtype=r.dtype, storage=r.storage, identity=info.get("identity"),
        created=info.get("created"), path=r.store_path or None, bytes=info.get("bytes"),
        lossy=manifest.lossy if manifest else None, splits=splits, why_no_hashes=why,
    )  # fmt: skip
    return card, manifest


def _manifest(path: str, identity: str | None) -> tuple[Any, str | None]:
    """The manifest of the local store at `path` if it is still the store the runs read (same
    identity); else None and why. Stores on object storage are not read: a report does not
    go to the network."""
    from loadbench.manifest import MANIFEST, read_manifest
    from loadbench.remote import is_url

    if not path:
        return None, "the runs recorded no store"
    if is_url(path):
        return None, f"the store is on object storage ({path}); its manifest.json has them"
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return None, f"the store is no longer at {path} (or is on another machine)"
    try:
        manifest = read_manifest(path)
    except LoadbenchError as e:
        return None, f"its manifest is not readable: {e}"
    if identity and manifest.identity != identity:
        return None, f"the store at {path} was made again from other settings since"
    return manifest, None


def _protocol(results: Results, records: list[RunRecord]) -> Protocol:
    exp, runs = results.experiment, results.runs
    repeats = runs.groupby(["dataset", *CONFIG, "cache"], dropna=False).size() if len(runs) else []
    seeds = {(r.repeat, r.seed) for r in records if r.repeat is not None and r.seed is not None}
    return Protocol(
        mode=exp.get("mode") or next((r.mode for r in records), None),
        epochs=_distinct(r.epochs_planned for r in records),
        batch_size=_distinct(r.batch_size for r in records),
        device_requested=_distinct(r.settings.get("device") for r in records),
        device_used=_distinct(r.device for r in records),
        timing=_distinct(runs["timing"]), cache=_distinct(runs["cache"]),
        repeats_planned=planned_repeats(exp),
        repeats_min=int(min(repeats, default=0)), repeats_max=int(max(repeats, default=0)),
        seed=exp.get("seed"),
        repeat_seeds=[RepeatSeed(repeat=k + 1, seed=s) for k, s in sorted(seeds)],
    )  # fmt: skip


def _distinct(values) -> list:
    return sorted({v for v in values if v is not None and v == v}, key=str)


def rank(results: Results, dataset: str) -> Ranking:
    """The configurations of `dataset`, fastest first (by median epoch time; ties by name)."""
    runs = warm_only(results.runs[results.runs["dataset"] == dataset])
    stats = aggregate(runs, CONFIG)  # the tables' medians and intervals, the same numbers
    timed = runs.groupby(CONFIG, sort=False, dropna=False)["epoch_s"].count().to_numpy()
    ranked = [
        Ranked(rank=0, configuration=config_name(r), median_epoch_s=_finite(r["epoch_s"]),
               ci95_low_s=_finite(r["epoch_ci_low"]), ci95_high_s=_finite(r["epoch_ci_high"]),
               repeats=int(n))
        for (_, r), n in zip(stats.iterrows(), timed, strict=True)
    ]  # fmt: skip
    ranked.sort(key=lambda c: (c.median_epoch_s is None, c.median_epoch_s or 0, c.configuration))
    for number, config in enumerate(ranked, 1):
        config.rank = number
    return Ranking(cache=", ".join(_distinct(runs["cache"])) or None, configurations=ranked)


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# -- files ---------------------------------------------------------------------------------------


def write_card(card: ResultCard, path: str) -> str:
    """`card` as strict JSON (NaN as null), atomically."""
    return write_json_atomic(path, card.model_dump(mode="json"), indent=1)


def card_of(results: Results) -> tuple[ResultCard, str]:
    """The card of another results directory: its own report/card.json when that was made
    from the records there now (it holds content hashes of stores this machine may not
    have), else one built from its records; and which, in words."""
    path = os.path.join(results.path, "report", CARD)
    try:
        with open(path, encoding="utf-8") as f:
            card = ResultCard.model_validate(json.load(f))
    except FileNotFoundError:
        return build_card(results), "built from its records"
    except (OSError, ValueError, ValidationError):  # JSONDecodeError is a ValueError
        return build_card(results), f"built from its records ({path} is not a readable card)"
    if card.card_schema != CARD_SCHEMA or card.runs_sha256 != runs_digest(results.path):
        return build_card(results), f"built from its records ({path} is of other records)"
    return card, f"{path} of {card.generated}"


# -- in the report -------------------------------------------------------------------------------


def card_lines(card: ResultCard) -> list[str]:
    """The card in a few lines of text (the rankings are tables: `ranking_tables`)."""
    m, s, p = card.machine, card.software, card.protocol
    gpus = ", ".join(str(g.get("name")) for g in m.gpus) or "none"
    ram = f"{m.ram_bytes / 2**30:.1f} GiB" if m.ram_bytes else "?"
    libraries = ", ".join(f"{k} {v}" for k, v in s.libraries.items() if v) or "not recorded"
    dirty = {True: " with uncommitted changes", False: "", None: ""}[s.git_dirty]
    seeds = ", ".join(f"{r.seed} (repeat {r.repeat})" for r in p.repeat_seeds) or "-"
    lines = [
        f"Machine: {m.cpu} ({m.cores_logical} logical, {m.cores_physical} physical cores), "
        f"RAM {ram}, GPUs: {gpus}; {m.os}",
        f"Software: loadbench {s.loadbench} (commit {s.git_commit}{dirty}), Python {s.python}, "
        f"torch {s.torch} (CUDA {s.torch_cuda}), numpy {s.numpy}; {libraries}",
        f"Protocol: mode {p.mode}; {_list(p.epochs)} epoch(s) per run, batch size "
        f"{_list(p.batch_size)}; device {_list(p.device_requested)} (ran on "
        f"{_list(p.device_used)}); timing {_list(p.timing)}; cache {_list(p.cache)}; repeats "
        f"per configuration {p.repeats_min}-{p.repeats_max} (planned {p.repeats_planned})",
        f"Seeds: experiment {p.seed}; per repeat {seeds}",
    ]
    if m.cpu is None and s.python is None:  # no env.json: said once, in the notes below
        lines = ["Machine and software: not recorded", *lines[2:]]
    for name, ds in card.datasets.items():
        shape = "x".join(map(str, ds.image_shape or [])) or "?"
        counts = ", ".join(f"{split} {n}" for split, n in ds.images.items())
        content = _hashes(ds.content) if ds.content else "unknown"
        stores = "; ".join(_store_words(store, ds.content) for store in ds.stores)
        lines.append(f"Dataset {name}: {ds.source} (limit {ds.limit or 'none'}, options "
                     f"{ds.options}); images {shape}; {counts}; content {content}; "
                     f"stores {stores}")  # fmt: skip
    lines += [f"Statistic: {card.statistic}"]
    lines += [f"Hash {name}: {what}" for name, what in card.hashes.items()]
    return lines + [f"Missing: {note}" for note in card.notes]


def _list(values: list) -> str:
    return ", ".join(map(str, values)) or "?"


def _store_words(store: StoreCard, content: dict[str, SplitHash] | None) -> str:
    """A store's identity, and its hashes where they are not the dataset's content's."""
    what = f"{store.format}/{store.dtype} identity {store.identity}"
    return what + (f" ({_hashes(store.splits)})" if store.splits not in (None, content) else "")


def _hashes(splits: dict[str, SplitHash]) -> str:
    return ", ".join(f"{split} images sha256 {h.images_sha256[:16]}" for split, h in splits.items())


def ranking_tables(card: ResultCard) -> list[Table]:
    """Per dataset: its configurations, fastest first, with median epoch time and interval."""
    tables = []
    for ds, ranking in card.rankings.items():
        rows = [[str(c.rank), c.configuration, _seconds(c.median_epoch_s),
                 f"{_seconds(c.ci95_low_s)}-{_seconds(c.ci95_high_s)}"
                 if c.ci95_low_s is not None else "-", str(c.repeats)]
                for c in ranking.configurations]  # fmt: skip
        tables.append(Table(f"Ranking: {ds} ({ranking.cache} cache)",
                            ["#", "configuration", "median epoch s", "95% interval", "repeats"],
                            rows))  # fmt: skip
    return tables


def _seconds(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"
