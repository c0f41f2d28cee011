"""The `loadbench` command line. Every command has --help with an example.

Errors about the user's input end as one line on stderr and exit code 2 (`--debug` shows the
traceback); heavy modules are imported inside commands so `--help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loadbench.errors import LoadbenchError

app = typer.Typer(
    name="loadbench",
    help="Which way of storing and loading an image dataset trains a PyTorch classifier "
    "fastest, at what memory cost: convert datasets into every storage format, prove each "
    "returns what went in, and measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
if not out.is_terminal:  # piped or captured: rich's 80 columns would cut paths in tables
    out = Console(width=160)
err = Console(stderr=True)
_state = {"debug": False}

SOURCE_PANEL = "Source options"
FORMAT_PANEL = "Format options"
SOURCE_HELP = (
    "Dataset: digits, synthetic:PRESET, cifar10:PATH, cifar100:PATH, mnist:PATH, "
    "fashion-mnist:PATH, tiny-imagenet:PATH, folder:PATH (options may follow ?a=1&b=2)."
)


def _source_option(help: str, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=SOURCE_PANEL)


def _format_option(help: str):
    return typer.Option(help=help, rich_help_panel=FORMAT_PANEL)


# Source options shared by `stats` and `convert`.
Limit = Annotated[int | None, _source_option("First N images of every split (stratified).")]
Remap = Annotated[
    str | None,
    _source_option("New classes from old: 'upper=0,2,3,4,6;trousers=1;shoes=5,7,9' or JSON."),
]
Drop = Annotated[str | None, _source_option("Classes to remove, by name or index: 'Bag' or '8,9'.")]
ValRatio = Annotated[float | None, _source_option("Carve a stratified val split from train.")]
TestRatio = Annotated[float | None, _source_option("Carve a stratified test split from train.")]
Seed = Annotated[int | None, _source_option("Seed of carved splits and generated data.")]
Size = Annotated[
    str | None, _source_option("folder/tiny-imagenet: resize+centre-crop to N or HxW.")
]
Channels = Annotated[int | None, _source_option("folder/tiny-imagenet/synthetic: 1 or 3 channels.")]
SkipCorrupt = Annotated[
    bool,
    _source_option("folder/tiny-imagenet: skip and count unreadable images.", "--skip-corrupt"),
]


def _source_options(**values: Any) -> dict[str, Any]:
    values["skip_corrupt"] = values.get("skip_corrupt") or None
    return {k: v for k, v in values.items() if v is not None}


def _load(spec: str, **options: Any):
    from loadbench import progress
    from loadbench.sources import load_source

    with progress.task(f"reading {spec}", None):
        return load_source(spec, **_source_options(**options))


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    if version:
        from loadbench import __version__

        out.print(f"loadbench {__version__}")
        raise typer.Exit()


@app.command()
def sources() -> None:
    """List the dataset sources and the synthetic presets.

    Example: [bold]loadbench sources[/bold]
    """
    from loadbench.sources import _load_kinds
    from loadbench.sources.synthetic import PRESETS

    table = Table(title="Sources (KIND:ARG?option=value&...)")
    table.add_column("source")
    table.add_column("what")
    table.add_column("options")
    for kind in _load_kinds().values():
        spec = kind.name + (f":{kind.arg}" if kind.arg else "")
        table.add_row(spec, kind.summary, ", ".join(kind.options.model_fields))
    out.print(table)
    presets = Table(title="synthetic presets")
    for column in ("preset", "shape", "classes", "train", "eval split"):
        presets.add_column(column)
    for name, p in PRESETS.items():
        presets.add_row(
            name,
            f"{p.size}x{p.size}x{p.channels}",
            str(p.classes),
            f"{p.count:,}",
            f"{p.eval_split} {p.eval_count:,}",
        )
    out.print(presets)


@app.command()
def formats() -> None:
    """List the storage formats, the dtypes each stores, and their options.

    Example: [bold]loadbench formats[/bold]
    """
    from loadbench.formats import list_formats

    table = Table(title="Storage formats")
    for column in ("format", "dtypes", "what", "options (default)"):
        table.add_column(column)
    for fmt in list_formats():
        options = "\n".join(
            f"--{k.replace('_', '-')} ({o.default if o.default is not None else 'auto'})"
            + (f": {'|'.join(map(str, o.choices))}" if o.choices and len(o.choices) < 8 else "")
            for k, o in fmt.options.items()
        )
        table.add_row(fmt.name, ", ".join(fmt.dtypes), fmt.summary, options or "-")
    out.print(table)


@app.command()
def stats(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    limit: Limit = None,
    remap: Remap = None,
    drop: Drop = None,
    val_ratio: ValRatio = None,
    test_ratio: TestRatio = None,
    seed: Seed = None,
    size: Size = None,
    channels: Channels = None,
    skip_corrupt: SkipCorrupt = False,
) -> None:
    """Print per split: counts, images per class, image sizes (original files too), channel mean/std.

    Example: [bold]loadbench stats cifar10:~/data/cifar-10-python.tar.gz[/bold]
    """
    from loadbench import progress
    from loadbench.stats import source_stats

    with progress.enabled():
        src = _load(
            source, limit=limit, remap=remap, drop=drop, val_ratio=val_ratio,
            test_ratio=test_ratio, seed=seed, size=size, channels=channels,
            skip_corrupt=skip_corrupt,
        )  # fmt: skip
        results = source_stats(src)
    out.print(f"[bold]{src.spec}[/bold]: {len(src.classes)} classes")
    for note in src.notes:
        out.print(f"[yellow]note:[/yellow] {note}")
    table = Table(title="Splits")
    for column in ("split", "images", "stored HxWxC", "bytes/image", "channel mean", "channel std"):
        table.add_column(column, justify="right")
    for s in results:
        h, w, c = s.image_shape
        table.add_row(
            s.split, f"{s.count:,}", f"{h}x{w}x{c}", f"{s.stored_bytes_per_image:,}",
            ", ".join(f"{v:.4f}" for v in s.channel_mean), ", ".join(f"{v:.4f}" for v in s.channel_std),
        )  # fmt: skip
    out.print(table)
    originals = [s for s in results if s.original_width is not None]
    if originals:
        sizes = Table(title="Original image files (before resizing)")
        for column in ("split", "", "min", "mean", "median", "max"):
            sizes.add_column(column, justify="right")
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
        out.print(sizes)
    classes = Table(title="Images per class")
    classes.add_column("class")
    for s in results:
        classes.add_column(s.split, justify="right")
    shown = src.classes if len(src.classes) <= 40 else src.classes[:20]
    for name in shown:
        classes.add_row(name, *(f"{s.class_counts[name]:,}" for s in results))
    if len(src.classes) > len(shown):
        classes.add_row(f"... {len(src.classes) - len(shown)} more", *("" for _ in results))
    out.print(classes)


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    format: Annotated[
        str, typer.Option("--format", "-f", help="A format, a comma-separated list, or 'all'.")
    ],
    out_dir: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Store directory (one format) or parent of <format>-<dtype>/ stores.",
        ),
    ],
    dtype: Annotated[
        str, typer.Option(help="uint8 (pixels), float16 or float32 (scaled to [0,1]).")
    ] = "uint8",
    overwrite: Annotated[
        bool, typer.Option(help="Replace a different store at the destination.")
    ] = False,
    limit: Limit = None,
    remap: Remap = None,
    drop: Drop = None,
    val_ratio: ValRatio = None,
    test_ratio: TestRatio = None,
    seed: Seed = None,
    size: Size = None,
    channels: Channels = None,
    skip_corrupt: SkipCorrupt = False,
    jpeg_quality: Annotated[int | None, _format_option("JPEG quality 1-100 (90).")] = None,
    jpeg_subsampling: Annotated[
        str | None, _format_option("JPEG chroma subsampling 4:4:4|4:2:2|4:2:0 (4:4:4).")
    ] = None,
    png_compression: Annotated[int | None, _format_option("PNG zlib level 0-9 (6).")] = None,
    chunk_images: Annotated[
        int | None, _format_option("hdf5/zarr: images per chunk (auto: ~1 MiB).")
    ] = None,
    compression: Annotated[
        str | None,
        _format_option("hdf5: none|gzip|lzf; zarr: none|blosc-zstd|blosc-lz4|zstd|gzip."),
    ] = None,
    compression_level: Annotated[int | None, _format_option("Codec level.")] = None,
    store: Annotated[str | None, _format_option("zarr: dir|zip.")] = None,
    shard_size: Annotated[
        int | None, _format_option("webdataset/tfrecord: images per shard (10000).")
    ] = None,
    encoding: Annotated[
        str | None, _format_option("webdataset: npy|png|jpeg; tfrecord: raw|png|jpeg.")
    ] = None,
) -> None:
    """Convert a dataset into one or more storage formats (atomic; an identical store is reused).

    Examples:
      [bold]loadbench convert digits --format all --out stores/[/bold]
      [bold]loadbench convert cifar10:~/data/cifar-10-python.tar.gz -f zarr --compression blosc-zstd -o stores/cifar-zarr[/bold]
      [bold]loadbench convert fashion-mnist:~/fmnist -f npy --dtype float16 --remap 'upper=0,2,3,4,6;trousers=1;shoes=5,7,9' --drop 8 -o stores/fm3[/bold]
    """
    from loadbench import progress
    from loadbench.conversion import convert as convert_one
    from loadbench.conversion import convert_many, resolve_formats

    format_options = {
        "jpeg_quality": jpeg_quality, "jpeg_subsampling": jpeg_subsampling,
        "png_compression": png_compression, "chunk_images": chunk_images,
        "compression": compression, "compression_level": compression_level, "store": store,
        "shard_size": shard_size, "encoding": encoding,
    }  # fmt: skip
    names = resolve_formats(format)
    with progress.enabled():
        src = _load(
            source, limit=limit, remap=remap, drop=drop, val_ratio=val_ratio,
            test_ratio=test_ratio, seed=seed, size=size, channels=channels,
            skip_corrupt=skip_corrupt,
        )  # fmt: skip
        for note in src.notes:
            err.print(f"[yellow]note:[/yellow] {note}")
        if format.strip() != "all" and len(names) == 1:
            given = {k: v for k, v in format_options.items() if v is not None}
            stores = [convert_one(src, names[0], out_dir, dtype, overwrite=overwrite, **given)]
            rows = [
                (names[0], stores[0], "exists (same settings): reused" if stores[0].skipped else "")
            ]
        else:
            results = convert_many(
                src, names, out_dir, dtype, overwrite=overwrite, **format_options
            )
            rows = [(r.format, r.store, r.note) for r in results]
    table = Table(title=f"{src.spec} -> {out_dir}")  # paths below are relative to out_dir
    for column in ("format", "dtype", "images", "size", "bytes/image", "convert s", "store"):
        table.add_column(column, justify="right" if column not in ("format", "store") else "left")
    for name, st, note in rows:
        if st is None:
            table.add_row(name, dtype, "-", "-", "-", "-", f"[yellow]{note}[/yellow]")
            continue
        m = st.manifest
        images = sum(info.count for info in m.splits.values())
        table.add_row(
            name, m.dtype, f"{images:,}", _mib(m.bytes), f"{m.bytes / max(images, 1):,.0f}",
            f"{m.convert_time_s:.2f}", _short(st.path, out_dir) + (f" [dim]({note})[/dim]" if note else ""),
        )  # fmt: skip
    out.print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command()
def verify(
    path: Annotated[
        str, typer.Argument(help="A store, or a folder of stores (from --format all).")
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
    table = Table(title=f"verify {path}" + (f" against {source}" if source else ""))
    for column in ("store", "split", "images", "checksum", "vs source", "result"):
        table.add_column(column, justify="right" if column == "images" else "left")
    for c in checks:
        checksum = "[green]ok[/green]" if c.checksum_ok else "[red]differs[/red]"
        if not c.compared:
            versus = "-"
        elif c.psnr_db is not None:
            versus = (
                f"PSNR {c.psnr_db:.1f} dB (worst {c.worst_psnr_db:.1f} dB, image {c.worst_index})"
            )
        else:
            versus = f"{c.exact_images:,}/{c.count:,} identical"
        result = "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]: " + "; ".join(c.problems)
        table.add_row(
            _short(c.store, path),
            c.split,
            f"{c.count:,}",
            checksum if c.split != "-" else "-",
            versus,
            result,
        )
    out.print(table)
    failed = [c for c in checks if not c.passed]
    if failed:
        err.print(f"[red]{len(failed)} of {len(checks)} split check(s) failed[/red]")
        raise typer.Exit(1)
    out.print(f"[green]all {len(checks)} split check(s) passed[/green]")


def _short(store_path: str, given: str) -> str:
    import os

    given = os.path.abspath(os.path.expanduser(given))
    rel = os.path.relpath(store_path, given)
    return os.path.basename(store_path) if rel == "." else rel


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    try:
        app()
    except LoadbenchError as e:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: say so, keep the traceback for --debug
        if _state["debug"]:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {e} (run again with --debug for the "
            "traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
