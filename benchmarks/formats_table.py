"""The table of docs/formats.md from a results directory: per format (and peer) of one dataset,
the bytes per image on disk, the conversion time, the loader alone (its loader-only twin:
img/s), and training from it (median steady-state epoch and the share of it spent waiting for
data). Medians over the repeats; the report of the same directory has their intervals.

    loadbench bench configs/formats.yaml --out results/formats
    python benchmarks/formats_table.py results/formats [--dataset cifar-like] [--markdown]
"""

from __future__ import annotations

import argparse

import pandas as pd

from loadbench.report.data import load_results, peer_mark, warm_only


def table(path: str, dataset: str | None) -> tuple[str, pd.DataFrame]:
    results = load_results(path)
    dataset = dataset or results.datasets[0]
    runs = warm_only(results.runs[results.runs["dataset"] == dataset])
    ceilings = results.ceilings[results.ceilings["dataset"] == dataset]
    loaders = ceilings[ceilings["mode"] == "loader-only"].groupby("format")["images_per_s"]
    trained = runs.groupby("format").agg(
        bytes_per_image=("bytes_per_image", "first"), convert_s=("convert_time_s", "first"),
        epoch_s=("epoch_s", "median"), stall=("stall_share", "median"),
        repeats=("key", "count"),
    )  # fmt: skip
    trained["loader_img_s"] = loaders.median()
    return dataset, trained.sort_values("loader_img_s", ascending=False)


def markdown(frame: pd.DataFrame) -> str:
    header = "| format | bytes/image | convert s | loader alone, img/s | epoch s | data wait |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in frame.iterrows():
        lines.append(
            f"| `{name}`{peer_mark(name)} | {r['bytes_per_image']:,.0f} | {r['convert_s']:.2f} | "
            f"{r['loader_img_s']:,.0f} | {r['epoch_s']:.2f} | {100 * r['stall']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results directory of `loadbench bench`")
    parser.add_argument("--dataset", help="the dataset's label (default: the first)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    dataset, frame = table(args.results, args.dataset)
    print(f"dataset: {dataset}")
    print(markdown(frame) if args.markdown else frame.to_string())


if __name__ == "__main__":
    main()
