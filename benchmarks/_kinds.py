"""loadbench against the peer loaders, per kind of data: image files (JPEG, PNG), arrays and
records. For each dataset and kind, loadbench's fastest access path on that kind is set beside
every peer that reads the same kind, at the same CPU budget (2 workers or 2 threads), and the
ratio to the fastest peer is the verdict: issue 17 asks for >= 1.0 on every kind.
"""

from __future__ import annotations

import math

import pandas as pd

from loadbench.formats import is_format

# kind -> (loadbench's formats, the peers that read the same kind of bytes)
KINDS = {
    "JPEG files": (["files-jpeg"], ["dali-files", "spdl-files", "torchvision-imagefolder"]),
    "PNG files": (["files-png"], ["dali-files", "spdl-files", "torchvision-imagefolder",
                                  "hf-datasets"]),
    "arrays": (["npy"], ["dali-npy", "spdl-npy", "litdata", "mds", "ffcv"]),
    "records": (["tfrecord", "webdataset", "lmdb", "arrayrecord"],
                ["tf-data", "dali-tfrecord", "dali-webdataset", "webdataset-lib", "grain"]),
}  # fmt: skip
# The file peers store JPEG in the JPEG experiment and PNG in the PNG one.
JPEG_OPTIONS = {"torchvision-imagefolder": {"encoding": "jpeg"}, "dali-files": {"encoding": "jpeg"},
                "spdl-files": {"encoding": "jpeg"}}  # fmt: skip
PNG_OPTIONS = {name: {"encoding": "png"} for name in JPEG_OPTIONS}
ACCESS = ["sample", "batch", "threads"]
WORKERS = 2  # the CPU budget of every row: 2 workers, or 2 threads


def _known(names: list[str]) -> list[str]:
    return [name for name in names if is_format(name)]


def experiments(datasets: list[dict], common: dict) -> dict[str, dict]:
    """Two experiments: JPEG files, arrays and records; then PNG files (the file peers' stores
    in the other encoding)."""
    first = [k for k in KINDS if k != "PNG files"]
    formats = [f for kind in first for group in KINDS[kind] for f in group]
    png = [f for group in KINDS["PNG files"] for f in group]
    base = {**common, "datasets": datasets, "workers": [WORKERS], "access": _access()}
    return {
        "kinds": {**base, "name": "kinds", "formats": _known(formats),
                  "format_options": {**common.get("format_options", {}), **JPEG_OPTIONS}},
        "kinds-png": {**base, "name": "kinds-png", "formats": _known(png),
                      "format_options": PNG_OPTIONS},
    }  # fmt: skip


def _access() -> list[str]:
    from loadbench.training.batches import ACCESS_MODES

    return [a for a in ACCESS if a in ACCESS_MODES]


def kinds_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per dataset and kind: loadbench's fastest path, the fastest peer, and each peer."""
    rows = []
    for kind, (ours, peers) in KINDS.items():
        table = tables["kinds-png" if kind == "PNG files" else "kinds"]
        for dataset in sorted(set(table["dataset"])):
            part = table[table["dataset"] == dataset]
            mine = part[part["format"].isin(ours)].sort_values("images_per_s", ascending=False)
            theirs = part[part["format"].isin(peers)].sort_values("images_per_s", ascending=False)
            if mine.empty:
                continue
            best = mine.iloc[0]
            peer = theirs.iloc[0] if len(theirs) else None
            peer_rate = float(peer["images_per_s"]) if peer is not None else math.nan
            rows.append({
                "dataset": dataset, "kind": kind,
                "loadbench": f"{best['format']}/{best['access']}",
                "loadbench img/s": float(best["images_per_s"]),
                "fastest peer": peer["format"] if peer is not None else "-",
                "peer img/s": peer_rate,
                "ratio": float(best["images_per_s"]) / peer_rate,
                "peers": "; ".join(f"{r['format']} {r['images_per_s']:,.0f}"
                                   for _, r in theirs.iterrows()),
            })  # fmt: skip
    return pd.DataFrame(rows)


def print_kinds(table: pd.DataFrame, cores: int) -> None:
    print(f"\nloadbench against the peers, per kind of data (loader only, budget {WORKERS} "
          f"cores of {cores}; img/s, median over repeats):")  # fmt: skip
    for _, r in table.iterrows():
        verdict = "met" if r["ratio"] >= 1.0 else ("MISSED" if r["ratio"] == r["ratio"] else "-")
        print(f"  [{r['dataset']}] {r['kind']}: loadbench {r['loadbench']} "
              f"{r['loadbench img/s']:,.0f} ({r['loadbench img/s'] / WORKERS:,.0f}/core) vs "
              f"{r['fastest peer']} {r['peer img/s']:,.0f}: {r['ratio']:.2f}x {verdict} "
              f"(target >= 1.0)")  # fmt: skip
        print(f"      every peer: {r['peers'] or '-'}")


def markdown(table: pd.DataFrame) -> str:
    """The kinds table as the README shows it."""
    lines = ["| dataset | kind | loadbench's fastest path | img/s | fastest peer | img/s | "
             "loadbench / peer |", "|---|---|---|---:|---|---:|---:|"]  # fmt: skip
    for _, r in table.iterrows():
        lines.append(f"| {r['dataset']} | {r['kind']} | {r['loadbench']} | "
                     f"{r['loadbench img/s']:,.0f} | {r['fastest peer']} | "
                     f"{r['peer img/s']:,.0f} | {r['ratio']:.2f}x |")  # fmt: skip
    return "\n".join(lines)
