"""The data commands: `sources`, `formats`, `stats`, `convert`, `verify`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from loadbench.cli.app import app, err, mib, short, stdout, table
from loadbench.cli.params import given, with_flags
from loadbench.formats import list_formats
from loadbench.options import OptionGroup
from loadbench.sources import source_options
from loadbench.sources.base import COMMON_OPTIONS

SOURCE_HELP = (
    "Dataset: digits, synthetic:PRESET, cifar10:PATH, cifar100:PATH, mnist:PATH, "
    "fashion-mnist:PATH, tiny-imagenet:PATH, folder:PATH (options may follow ?a=1&b=2)."
)
SOURCE_FLAGS = OptionGroup.of("Source options", COMMON_OPTIONS, owned=source_options())
FORMAT_FLAGS = OptionGroup.of(
    "Format options", owned={f.name: f.options for f in list_formats(peers=True)}
)
Source = Annotated[str, typer.Argument(help=SOURCE_HELP)]


def load(spec: str, options: dict[str, Any]):
    """The source `spec` with the source options given on the command line."""
    from loadbench import progress
    from loadbench.sources import load_source

    with progress.task(f"reading {spec}", None):
        return load_source(spec, **given(options, SOURCE_FLAGS))


@app.command()
def sources() -> None:
    """List the dataset sources and the synthetic presets.

    Example: [bold]loadbench sources[/bold]
    """
    from loadbench.sources import _load_kinds
    from loadbench.sources.synthetic import PRESETS

    kinds = table("Sources (KIND:ARG?option=value&...)", ["source", "what", "options"])
    for kind in _load_kinds().values():
        spec = kind.name + (f":{kind.arg}" if kind.arg else "")
        kinds.add_row(spec, kind.summary, ", ".join(kind.declared))
    stdout.print(kinds)
    presets = table("synthetic presets", ["preset", "shape", "classes", "train", "eval split"])
    for name, p in PRESETS.items():
        presets.add_row(
            name, f"{p.size}x{p.size}x{p.channels}", str(p.classes), f"{p.count:,}",
            f"{p.eval_split} {p.eval_count:,}",
        )  # fmt: skip
    stdout.print(presets)


@app.command()
def formats() -> None:
    """List the storage formats and the peer loaders: dtypes, options, and what a peer needs.

    Peer loaders are other projects' libraries (torchvision ImageFolder, webdataset, Hugging
    Face datasets, litdata) over the same data, benchmarked beside loadbench's formats.

    Example: [bold]loadbench formats[/bold]
    """
    for title, peers in (("Storage formats", False), ("Peer loaders (sample access)", True)):
        shown = table(title, ["format", "dtypes", "what", "options (default)"])
        for fmt in list_formats(peers=True):
            if fmt.peer != peers:
                continue
            options = "\n".join(
                f"--{key.replace('_', '-')}: {option.describe()}"
                for key, option in fmt.options.items()
            )
            missing = fmt.missing()
            what = fmt.summary + (f"\n[red]{missing}[/red]" if missing else "")
            shown.add_row(fmt.name, ", ".join(fmt.dtypes), what, options or "-")
        stdout.print(shown)


@app.command()
@with_flags(SOURCE_FLAGS)
def stats(source: Source, **options: Any) -> None:
    """Print per split: counts, images per class, image sizes (original files too), channel mean/std.

    Example: [bold]loadbench stats cifar10:~/data/cifar-10-python.tar.gz[/bold]
    """
    from loadbench import progress
    from loadbench.stats import source_stats

    with progress.enabled():
        src = load(source, options)
        results = source_stats(src)
    stdout.print(f"[bold]{src.spec}[/bold]: {len(src.classes)} classes")
    for note in src.notes:
        stdout.print(f"[yellow]note:[/yellow] {note}")
    columns = ["split", "images", "stored HxWxC", "bytes/image", "channel mean", "channel std"]
    splits = table("Splits", columns, right=tuple(columns))
    for s in results:
        h, w, c = s.image_shape
        splits.add_row(
            s.split, f"{s.count:,}", f"{h}x{w}x{c}", f"{s.stored_bytes_per_image:,}",
            ", ".join(f"{v:.4f}" for v in s.channel_mean), ", ".join(f"{v:.4f}" for v in s.channel_std),
        )  # fmt: skip
    stdout.print(splits)
    _print_original_sizes(results)
    _print_class_counts(src.classes, results)


def _print_original_sizes(results) -> None:
    originals = [s for s in results if s.original_width is not None]
    if not originals:
        return
    columns = ["split", "", "min", "mean", "median", "max"]
    sizes = table("Original image files (before resizing)", columns, right=tuple(columns))
    for s in originals:
        for label, summary in (
            ("width px", s.original_width),
            ("height px", s.original_height),
            ("file bytes", s.original_file_bytes),
        ):
            sizes.add_row(
                s.split, label, f"{summary.min:,.0f}", f"{summary.mean:,.1f}",
                f"{summary.median:,.0f}", f"{summary.max:,.0f}",
            )  # fmt: skip
    stdout.print(sizes)


def _print_class_counts(classes: list[str], results) -> None:
    counts = table("Images per class", ["class"])
    for s in results:
        counts.add_column(s.split, justify="right")
    shown = classes if len(classes) <= 40 else classes[:20]
    for name in shown:
        counts.add_row(name, *(f"{s.class_counts[name]:,}" for s in results))
    if len(classes) > len(shown):
        counts.add_row(f"... {len(classes) - len(shown)} more", *("" for _ in results))
    stdout.print(counts)


@app.command()
@with_flags(SOURCE_FLAGS, FORMAT_FLAGS)
def convert(
    source: Source,
    format: Annotated[
        str, typer.Option("--format", "-f", help="A format, a comma-separated list, or 'all'.")
    ],
    out_dir: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Store directory (one format) or parent of <format>-<dtype>/ stores; or an "
            "fsspec URL (s3://bucket/prefix; endpoint and credentials from AWS_* variables).",
        ),
    ],
    dtype: Annotated[
        str, typer.Option(help="uint8 (pixels), float16 or float32 (scaled to [0,1]).")
    ] = "uint8",
    overwrite: Annotated[
        bool, typer.Option(help="Replace a different store at the destination.")
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Processes that convert at once; 0 = one per CPU core. The store is the same "
            "as with 1. Formats with one writer per split (hdf5, lmdb, some peers) use the "
            "others to read the source.",
        ),
    ] = 1,
    **options: Any,
) -> None:
    """Convert a dataset into one or more storage formats (atomic; an identical store is reused).

    Examples:
      [bold]loadbench convert digits --format all --out stores/[/bold]
      [bold]loadbench convert cifar10:~/data/cifar-10-python.tar.gz -f zarr --compression blosc-zstd -o stores/cifar-zarr[/bold]
      [bold]loadbench convert fashion-mnist:~/fmnist -f npy --dtype float16 --remap 'upper=0,2,3,4,6;trousers=1;shoes=5,7,9' --drop 8 -o stores/fm3[/bold]
      [bold]AWS_ENDPOINT_URL=http://127.0.0.1:9000 loadbench convert digits -f zarr,webdataset,npy -o s3://bucket/stores[/bold]
    """
    from loadbench import progress
    from loadbench.conversion import convert as convert_one
    from loadbench.conversion import convert_many, resolve_formats, resolve_jobs

    jobs = resolve_jobs(jobs)  # refused before the source is read
    names = resolve_formats(format)
    format_options = given(options, FORMAT_FLAGS)
    with progress.enabled():
        src = load(source, options)
        for note in src.notes:
            err.print(f"[yellow]note:[/yellow] {note}")
        if format.strip() != "all" and len(names) == 1:
            store = convert_one(src, names[0], out_dir, dtype, overwrite=overwrite, jobs=jobs,
                                **format_options)  # fmt: skip
            rows = [(names[0], store, "exists (same settings): reused" if store.skipped else "")]
        else:
            results = convert_many(src, names, out_dir, dtype, overwrite=overwrite, jobs=jobs,
                                   **format_options)  # fmt: skip
            rows = [(r.format, r.store, r.note) for r in results]
    _print_stores(f"{src.spec} -> {out_dir}", rows, dtype, out_dir)


def _print_stores(title: str, rows, dtype: str, out_dir: str) -> None:
    """What `convert` made: one row per format (paths relative to `out_dir`)."""
    columns = ["format", "dtype", "images", "size", "bytes/image", "convert s", "store"]
    stores = table(title, columns, right=tuple(columns[1:-1]))
    for name, st, note in rows:
        if st is None:
            stores.add_row(name, dtype, "-", "-", "-", "-", f"[yellow]{note}[/yellow]")
            continue
        m = st.manifest
        images = sum(info.count for info in m.splits.values())
        stores.add_row(
            name, m.dtype, f"{images:,}", mib(m.bytes), f"{m.bytes / max(images, 1):,.0f}",
            f"{m.convert_time_s:.2f}", short(st.path, out_dir) + (f" [dim]({note})[/dim]" if note else ""),
        )  # fmt: skip
    stdout.print(stores)


@app.command()
def verify(
    path: Annotated[
        str,
        typer.Argument(help="A store, or a folder of stores (from --format all); or an s3:// URL."),
    ],
    source: Annotated[
        str | None,
        typer.Option(
            help="Compare with this source too; without ?options the store's own are used."
        ),
    ] = None,
    psnr_min: Annotated[float, typer.Option(help="Fail lossy stores under this PSNR (dB).")] = 30.0,
) -> None:
    """Re-read every image of every split and check it against the manifest (and the source).

    Example: [bold]loadbench verify stores/ --source digits[/bold]
    """
    from loadbench import progress
    from loadbench.verify import verify_path

    with progress.enabled():
        checks = verify_path(path, source, psnr_min)
    title = f"verify {path}" + (f" against {source}" if source else "")
    shown = table(
        title, ["store", "split", "images", "checksum", "vs source", "result"], ("images",)
    )
    for c in checks:
        checksum = "[green]ok[/green]" if c.checksum_ok else "[red]differs[/red]"
        result = "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]: " + "; ".join(c.problems)
        shown.add_row(short(c.store, path), c.split, f"{c.count:,}",
                      checksum if c.split != "-" else "-", _versus(c), result)  # fmt: skip
    stdout.print(shown)
    failed = [c for c in checks if not c.passed]
    if failed:
        err.print(f"[red]{len(failed)} of {len(checks)} split check(s) failed[/red]")
        raise typer.Exit(1)
    stdout.print(f"[green]all {len(checks)} split check(s) passed[/green]")


def _versus(c) -> str:
    """A split check's comparison with the source, in one cell."""
    if not c.compared:
        return "-"
    if c.psnr_db is not None:
        return f"PSNR {c.psnr_db:.1f} dB (worst {c.worst_psnr_db:.1f} dB, image {c.worst_index})"
    return f"{c.exact_images:,}/{c.count:,} identical"
