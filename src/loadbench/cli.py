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
from loadbench.progress import make_console

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
stdout = make_console()
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
        from loadbench.version import __version__

        stdout.print(f"loadbench {__version__}")
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
    stdout.print(table)
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
    stdout.print(presets)


@app.command()
def formats() -> None:
    """List the storage formats and the peer loaders: dtypes, options, and what a peer needs.

    Peer loaders are other projects' libraries (torchvision ImageFolder, webdataset, Hugging
    Face datasets, litdata) over the same data, benchmarked beside loadbench's formats.

    Example: [bold]loadbench formats[/bold]
    """
    from loadbench.formats import list_formats

    for title, peers in (("Storage formats", False), ("Peer loaders (sample access)", True)):
        table = Table(title=title)
        for column in ("format", "dtypes", "what", "options (default)"):
            table.add_column(column)
        for fmt in list_formats(peers=True):
            if fmt.peer != peers:
                continue
            options = "\n".join(_option_line(k, o) for k, o in fmt.options.items())
            missing = fmt.missing()
            what = fmt.summary + (f"\n[red]{missing}[/red]" if missing else "")
            table.add_row(fmt.name, ", ".join(fmt.dtypes), what, options or "-")
        stdout.print(table)


def _option_line(key: str, option) -> str:
    default = option.default if option.default is not None else "auto"
    line = f"--{key.replace('_', '-')} ({default})"
    if option.choices and len(option.choices) < 8:
        line += f": {'|'.join(map(str, option.choices))}"
    return line


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
    stdout.print(f"[bold]{src.spec}[/bold]: {len(src.classes)} classes")
    for note in src.notes:
        stdout.print(f"[yellow]note:[/yellow] {note}")
    table = Table(title="Splits")
    for column in ("split", "images", "stored HxWxC", "bytes/image", "channel mean", "channel std"):
        table.add_column(column, justify="right")
    for s in results:
        h, w, c = s.image_shape
        table.add_row(
            s.split, f"{s.count:,}", f"{h}x{w}x{c}", f"{s.stored_bytes_per_image:,}",
            ", ".join(f"{v:.4f}" for v in s.channel_mean), ", ".join(f"{v:.4f}" for v in s.channel_std),
        )  # fmt: skip
    stdout.print(table)
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
        stdout.print(sizes)
    classes = Table(title="Images per class")
    classes.add_column("class")
    for s in results:
        classes.add_column(s.split, justify="right")
    shown = src.classes if len(src.classes) <= 40 else src.classes[:20]
    for name in shown:
        classes.add_row(name, *(f"{s.class_counts[name]:,}" for s in results))
    if len(src.classes) > len(shown):
        classes.add_row(f"... {len(src.classes) - len(shown)} more", *("" for _ in results))
    stdout.print(classes)


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
      [bold]AWS_ENDPOINT_URL=http://127.0.0.1:9000 loadbench convert digits -f zarr,webdataset,npy -o s3://bucket/stores[/bold]
    """
    from loadbench import progress
    from loadbench.conversion import convert as convert_one
    from loadbench.conversion import convert_many, resolve_formats, resolve_jobs

    jobs = resolve_jobs(jobs)  # refused before the source is read
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
            stores = [
                convert_one(src, names[0], out_dir, dtype, overwrite=overwrite, jobs=jobs, **given)
            ]
            rows = [
                (names[0], stores[0], "exists (same settings): reused" if stores[0].skipped else "")
            ]
        else:
            results = convert_many(
                src, names, out_dir, dtype, overwrite=overwrite, jobs=jobs, **format_options
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
    stdout.print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


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
    stdout.print(table)
    failed = [c for c in checks if not c.passed]
    if failed:
        err.print(f"[red]{len(failed)} of {len(checks)} split check(s) failed[/red]")
        raise typer.Exit(1)
    stdout.print(f"[green]all {len(checks)} split check(s) passed[/green]")


def _short(store_path: str, given: str) -> str:
    import os

    from loadbench.remote import is_url

    if is_url(store_path) or is_url(given):
        rel = store_path[len(given.rstrip("/")) :].lstrip("/")
        return rel or store_path.rstrip("/").rsplit("/", 1)[-1]
    given = os.path.abspath(os.path.expanduser(given))
    rel = os.path.relpath(store_path, given)
    return os.path.basename(store_path) if rel == "." else rel


MODEL_PANEL = "Model"
OPTIM_PANEL = "Optimizer and schedule"
DATA_PANEL = "Data and loading"
RUN_PANEL = "Run"


def _opt(help: str, panel: str, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel)


DataArg = Annotated[
    str | None,
    typer.Argument(help="A store (from loadbench convert) or a source spec, e.g. digits."),
]
ModelOpt = Annotated[
    str | None, _opt("cnn-tiny, cnn-blocks, mlp, resnet18, resnet50 (cnn-blocks).", MODEL_PANEL)
]
Filters = Annotated[int | None, _opt("cnn-tiny: filters per conv (5).", MODEL_PANEL)]
Widths = Annotated[str | None, _opt("cnn-blocks: filters per block (20,40,80,160).", MODEL_PANEL)]
Activation = Annotated[str | None, _opt("cnn-blocks: relu|sigmoid|selu (relu).", MODEL_PANEL)]
BatchNorm = Annotated[
    bool | None,
    _opt("cnn-blocks: batch norm after every conv.", MODEL_PANEL, "--batch-norm/--no-batch-norm"),
]
Dropout = Annotated[
    str | None, _opt("cnn-blocks/mlp: one rate or one per block: 0.1,0.2,0.3,0.4.", MODEL_PANEL)
]
Pool = Annotated[int | None, _opt("cnn-blocks: max-pool size per block (2).", MODEL_PANEL)]
Head = Annotated[
    str | None, _opt("cnn-blocks: flatten|gap; gap accepts any image size (gap).", MODEL_PANEL)
]
Hidden = Annotated[str | None, _opt("mlp: hidden layer widths (512,256).", MODEL_PANEL)]
Weights = Annotated[
    str | None, _opt("resnet: a local state-dict file of pretrained weights.", MODEL_PANEL)
]
Freeze = Annotated[
    bool | None,
    _opt("resnet: train only the new head.", MODEL_PANEL, "--freeze-backbone/--no-freeze-backbone"),
]
Stem = Annotated[
    str | None, _opt("resnet: auto|imagenet|small (auto: small under 96 px).", MODEL_PANEL)
]
BatchSize = Annotated[int | None, _opt("Images per batch (64).", DATA_PANEL)]
Optimizer = Annotated[str | None, _opt("sgd|rmsprop|adam|adamw (adam).", OPTIM_PANEL)]
Lr = Annotated[float | None, _opt("Learning rate (sgd 0.01, others 0.001).", OPTIM_PANEL)]
Momentum = Annotated[float | None, _opt("sgd/rmsprop momentum (0.9).", OPTIM_PANEL)]
Nesterov = Annotated[
    bool | None, _opt("sgd: Nesterov momentum.", OPTIM_PANEL, "--nesterov/--no-nesterov")
]
WeightDecay = Annotated[float | None, _opt("L2 weight decay (0; adamw 0.01).", OPTIM_PANEL)]
Augment = Annotated[str | None, _opt("Any of flip,crop,rotate,jitter.", DATA_PANEL)]
Access = Annotated[str | None, _opt("sample|batch|device (sample).", DATA_PANEL)]
Workers = Annotated[int | None, _opt("DataLoader worker processes (0).", DATA_PANEL)]
Shuffle = Annotated[
    str | None,
    _opt("exact|block: block reads chunk by chunk, less random (exact).", DATA_PANEL),
]
ShuffleWindow = Annotated[int | None, _opt("block shuffle: chunks mixed together (8).", DATA_PANEL)]
ChunkCache = Annotated[
    int | None, _opt("MiB of decoded chunks cached per process, 0 = off (256).", DATA_PANEL)
]
CacheDir = Annotated[
    str | None,
    _opt("s3:// stores: read through a local copy kept here (default: read in place).", DATA_PANEL),
]
Device = Annotated[str | None, _opt("auto|cpu|cuda (auto: cuda when present).", RUN_PANEL)]
SeedOpt = Annotated[int | None, _opt("Seeds Python, NumPy and torch (0).", RUN_PANEL)]
Config = Annotated[str | None, _opt("A YAML file of these options (flags win).", RUN_PANEL)]


@app.command()
def train(
    data: DataArg = None,
    model: ModelOpt = None,
    filters: Filters = None,
    widths: Widths = None,
    activation: Activation = None,
    batch_norm: BatchNorm = None,
    dropout: Dropout = None,
    pool: Pool = None,
    head: Head = None,
    hidden: Hidden = None,
    weights: Weights = None,
    freeze_backbone: Freeze = None,
    stem: Stem = None,
    epochs: Annotated[int | None, _opt("Epochs (10).", RUN_PANEL)] = None,
    batch_size: BatchSize = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    momentum: Momentum = None,
    nesterov: Nesterov = None,
    weight_decay: WeightDecay = None,
    schedule: Annotated[
        str | None, _opt("none|step|multistep|cyclic|cosine-restarts|onecycle.", OPTIM_PANEL)
    ] = None,
    step_size: Annotated[
        int | None, _opt("step: epochs between decays (epochs/3).", OPTIM_PANEL)
    ] = None,
    gamma: Annotated[float | None, _opt("step/multistep: decay factor (0.1).", OPTIM_PANEL)] = None,
    milestones: Annotated[str | None, _opt("multistep: epochs, e.g. 50,75.", OPTIM_PANEL)] = None,
    max_lr: Annotated[
        float | None, _opt("cyclic/onecycle: peak lr (cyclic 4x lr; onecycle lr).", OPTIM_PANEL)
    ] = None,
    cycle_epochs: Annotated[
        float | None, _opt("cyclic: epochs per cycle (4).", OPTIM_PANEL)
    ] = None,
    restart_epochs: Annotated[
        float | None, _opt("cosine-restarts: first period in epochs (epochs/4).", OPTIM_PANEL)
    ] = None,
    restart_mult: Annotated[
        int | None, _opt("cosine-restarts: period growth factor (1).", OPTIM_PANEL)
    ] = None,
    augment: Augment = None,
    normalize: Annotated[
        bool | None,
        _opt(
            "Per-channel mean/std of train (on; off for cnn-tiny).",
            DATA_PANEL,
            "--normalize/--no-normalize",
        ),
    ] = None,
    balance: Annotated[str | None, _opt("none|weighted|oversample (none).", DATA_PANEL)] = None,
    val_ratio: Annotated[
        float | None, _opt("Carve a stratified val split from train.", DATA_PANEL)
    ] = None,
    eval_split: Annotated[
        str | None, _opt("Split to evaluate on (val, else test, else carved).", DATA_PANEL)
    ] = None,
    access: Access = None,
    workers: Workers = None,
    shuffle: Shuffle = None,
    shuffle_window: ShuffleWindow = None,
    chunk_cache_mb: ChunkCache = None,
    cache_dir: CacheDir = None,
    pin_memory: Annotated[
        bool | None,
        _opt("Pinned host memory (on with CUDA).", DATA_PANEL, "--pin-memory/--no-pin-memory"),
    ] = None,
    early_stopping: Annotated[
        int | None, _opt("Stop after N epochs without val-loss gain; restore the best.", RUN_PANEL)
    ] = None,
    kfold: Annotated[
        int | None, _opt("K-fold cross-validation on the training split.", RUN_PANEL)
    ] = None,
    device: Device = None,
    amp: Annotated[
        bool | None,
        _opt("Mixed precision (fp16 on CUDA, bf16 on CPU).", RUN_PANEL, "--amp/--no-amp"),
    ] = None,
    compile: Annotated[
        bool | None,
        _opt(
            "torch.compile the model (compile time reported apart).",
            RUN_PANEL,
            "--compile/--no-compile",
        ),
    ] = None,
    seed: SeedOpt = None,
    smooth: Annotated[
        float | None, _opt("EMA smoothing of the curves plot, 0-0.99 (0).", RUN_PANEL)
    ] = None,
    overfit_batch: Annotated[
        bool, _opt("Only check that one batch can be learnt to 100%.", RUN_PANEL, "--overfit-batch")
    ] = False,
    out: Annotated[str | None, _opt("Run directory (runs/<time>-<model>).", RUN_PANEL)] = None,
    config: Config = None,
    resume: Annotated[str | None, _opt("Continue the run in this directory.", RUN_PANEL)] = None,
) -> None:
    """Train a classifier from a store or a source; writes history, metrics, curves and the model.

    Examples:
      [bold]loadbench train digits --model cnn-blocks --head gap --epochs 15[/bold]
      [bold]loadbench train stores/cifar-npy --model cnn-tiny --optimizer sgd --lr 0.001 --momentum 0.9 --epochs 150[/bold]
      [bold]loadbench train stores/cifar-hdf5 --model cnn-blocks --batch-norm --dropout 0.1,0.2,0.3,0.4 --schedule onecycle --augment flip,crop[/bold]
      [bold]loadbench train --resume runs/20261122-101500-cnn-blocks --epochs 30[/bold]
      [bold]torchrun --nproc-per-node 2 -m loadbench train stores/npy-uint8 --epochs 3[/bold]  (DDP: gloo on CPU, nccl on CUDA)
    """
    from loadbench import progress
    from loadbench.training.config import load_config
    from loadbench.training.distributed import is_main_process
    from loadbench.training.train import resume_config, summary_line
    from loadbench.training.train import train as run_training

    options = {
        "data": data, "model": model, "filters": filters, "widths": widths,
        "activation": activation, "batch_norm": batch_norm, "dropout": dropout, "pool": pool,
        "head": head, "hidden": hidden, "weights": weights, "freeze_backbone": freeze_backbone,
        "stem": stem, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
        "lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
        "schedule": schedule, "step_size": step_size, "gamma": gamma, "milestones": milestones,
        "max_lr": max_lr, "cycle_epochs": cycle_epochs, "restart_epochs": restart_epochs,
        "restart_mult": restart_mult, "augment": augment, "normalize": normalize,
        "balance": balance, "val_ratio": val_ratio, "eval_split": eval_split, "access": access,
        "workers": workers, "shuffle": shuffle, "shuffle_window": shuffle_window,
        "chunk_cache_mb": chunk_cache_mb, "cache_dir": cache_dir, "pin_memory": pin_memory,
        "early_stopping": early_stopping,
        "kfold": kfold, "device": device, "amp": amp, "compile": compile, "seed": seed,
        "smooth": smooth, "out": out,
    }  # fmt: skip
    cfg = resume_config(resume, **options) if resume else load_config(config, **options)
    with progress.enabled():
        if overfit_batch or cfg.overfit_batch:
            _overfit(cfg)
            return
        result = run_training(cfg, resume=bool(resume))
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    if cfg.kfold and not resume:
        summary = result.metrics["kfold"]
        stdout.print(
            f"{cfg.kfold}-fold val accuracy {summary['accuracy']['mean']:.4f} "
            f"+- {summary['accuracy']['std']:.4f}, macro F1 {summary['f1_macro']['mean']:.4f} "
            f"+- {summary['f1_macro']['std']:.4f}"
        )
    else:
        stdout.print(summary_line(result.metrics))
    stdout.print(f"run directory: {result.out_dir}")


def _overfit(cfg) -> None:
    from loadbench.training.loop import Run

    with Run(cfg) as run:
        sanity = run.initial_loss()
        stdout.print(
            f"loss before training {sanity['initial_loss']:.4f} (ln {len(run.classes)} = "
            f"{sanity['expected_ln_classes']:.4f})"
        )
        result = run.overfit_batch()
    verdict = "[green]learnt[/green]" if result["learnt"] else "[red]not learnt[/red]"
    stdout.print(
        f"one batch of {result['batch_size']}: {verdict} after {result['steps']} steps, "
        f"accuracy {result['accuracy']:.3f}, loss {result['loss']:.4f}"
    )
    if not result["learnt"]:
        raise typer.Exit(1)


@app.command("lr-find")
def lr_find_command(
    data: DataArg = None,
    model: ModelOpt = None,
    filters: Filters = None,
    widths: Widths = None,
    activation: Activation = None,
    batch_norm: BatchNorm = None,
    dropout: Dropout = None,
    pool: Pool = None,
    head: Head = None,
    hidden: Hidden = None,
    weights: Weights = None,
    freeze_backbone: Freeze = None,
    stem: Stem = None,
    batch_size: BatchSize = None,
    optimizer: Optimizer = None,
    momentum: Momentum = None,
    nesterov: Nesterov = None,
    weight_decay: WeightDecay = None,
    augment: Augment = None,
    access: Access = None,
    workers: Workers = None,
    device: Device = None,
    seed: SeedOpt = None,
    start_lr: Annotated[float, typer.Option(help="First lr of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last lr of the sweep.")] = 10.0,
    iterations: Annotated[int, typer.Option(help="Batches in the sweep.")] = 100,
    out: Annotated[str, typer.Option(help="Directory for lr_find.png and lr_find.csv.")] = ".",
    config: Config = None,
) -> None:
    """Sweep the learning rate exponentially over batches; plot the loss and suggest an lr.

    Example: [bold]loadbench lr-find stores/cifar-npy --model cnn-blocks --batch-norm --optimizer sgd --out runs/lrf[/bold]
    """
    import csv
    import os

    from loadbench import progress
    from loadbench.training.config import load_config
    from loadbench.training.loop import Run
    from loadbench.training.lr_find import lr_find
    from loadbench.training.plots import plot_lr_find

    if iterations < 5 or not 0 < start_lr < end_lr:
        raise LoadbenchError("lr-find needs 0 < --start-lr < --end-lr and --iterations >= 5")
    cfg = load_config(
        config, data=data, model=model, filters=filters, widths=widths, activation=activation,
        batch_norm=batch_norm, dropout=dropout, pool=pool, head=head, hidden=hidden,
        weights=weights, freeze_backbone=freeze_backbone, stem=stem, batch_size=batch_size,
        optimizer=optimizer, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        augment=augment, access=access, workers=workers, device=device, seed=seed,
    )  # fmt: skip
    with progress.enabled(), Run(cfg) as run:
        result = lr_find(run, start_lr, end_lr, iterations)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lr_find.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.lrs, result.losses, result.smoothed, strict=True))
    png = plot_lr_find(result.lrs, result.losses, os.path.join(out, "lr_find.png"),
                       suggestion=result.suggestion, smoothed=result.smoothed)  # fmt: skip
    if result.suggestion is None:
        out_text = (
            "no lr to suggest: the loss did not fall anywhere in the sweep; try a wider range "
            "or more --iterations"
        )
    else:
        out_text = (
            f"suggested lr {result.suggestion:.3g} (steepest descent; lowest loss at "
            f"{result.min_loss_lr:.3g}, a tenth of it is {result.min_loss_lr / 10:.3g})"
        )
    stdout.print(f"{out_text}\nplot: {png}")


@app.command()
def predict(
    model_file: Annotated[str, typer.Argument(help="A model.pt written by loadbench train.")],
    images: Annotated[list[str], typer.Argument(help="Image files of any size.")],
    top: Annotated[int, typer.Option(help="Classes to show per image.")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Classify image files with a trained model and print the top classes with probabilities.

    Example: [bold]loadbench predict runs/digits/model.pt photo.png scan-28x32.png[/bold]
    """
    from loadbench.training.predict import predict_files

    for p in predict_files(model_file, images, top=top, device=device):
        h, w = p.size
        ranked = ", ".join(f"{name} {prob:.1%}" for name, prob in p.top)
        stdout.print(f"{p.path} ({h}x{w}): {ranked}", highlight=False)


@app.command()
def models(
    input_shape: Annotated[str, typer.Option("--input", help="Image size HxWxC.")] = "32x32x3",
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 10,
) -> None:
    """List the models with their parameter counts for an input shape.

    Example: [bold]loadbench models --input 28x28x1 --classes 10[/bold]
    """
    from loadbench.training.models import models_table

    try:
        h, w, c = (int(v) for v in input_shape.lower().split("x"))
    except ValueError:
        raise LoadbenchError(f"--input {input_shape!r} is not HxWxC, e.g. 32x32x3") from None
    table = Table(title=f"Models for {h}x{w}x{c} images, {classes} classes")
    for column in ("model", "what", "parameters", "options (defaults)"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, summary, count, options in models_table((c, h, w), classes):
        table.add_row(name, summary, f"{count:,}", options)
    stdout.print(table)


@app.command()
def bench(
    experiment: Annotated[
        str | None, typer.Argument(help="An experiment YAML (default: the built-in one).")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Results directory (results/<experiment name>).")
    ] = None,
    stores: Annotated[
        str | None,
        typer.Option(
            help="Where converted stores are kept and reused (~/.cache/loadbench/stores)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the matrix, run nothing.")
    ] = False,
) -> None:
    """Run an experiment: convert what is missing, then every run in its own process, with telemetry.

    Re-running the same command skips finished runs, so a killed experiment resumes.

    Examples:
      [bold]loadbench bench[/bold]                                   (the built-in experiment)
      [bold]loadbench bench configs/thesis.yaml --out results/thesis[/bold]
    """
    import os

    from loadbench import progress
    from loadbench.bench.experiment import load_experiment
    from loadbench.bench.matrix import expand, plan_runs
    from loadbench.bench.runner import run_experiment

    exp = load_experiment(experiment)
    results = out_dir or os.path.join("results", exp.name)
    cells = expand(exp)
    runs = plan_runs(exp, cells)
    skipped = [c for c in cells if c.skip]
    stdout.print(
        f"experiment [bold]{exp.name}[/bold]: {len(cells) - len(skipped)} combinations x "
        f"{exp.repeats} repeats = {len(runs)} runs, {exp.epochs} epoch(s) each, mode {exp.mode}"
    )
    for cell in skipped:
        stdout.print(f"[yellow]not run:[/yellow] {cell.label}: {cell.skip}", highlight=False)
    if dry_run:
        for spec in runs:
            stdout.print(
                f"  {spec.key}  {spec.cell.label}  repeat {spec.repeat + 1}", highlight=False
            )
        return
    with progress.enabled():
        outcome = run_experiment(exp, results, stores)
    for label, why in outcome.not_run:
        if not any(label == c.label for c in skipped):
            stdout.print(f"[yellow]not run:[/yellow] {label}: {why}", highlight=False)
    _print_report(results)
    stdout.print(
        f"{outcome.ok} run(s) done, {outcome.failed} failed, {outcome.skipped_done} already "
        f"done before; results in {results}"
    )
    if outcome.failed:
        raise typer.Exit(1)


def _print_report(results_dir: str, out_dir: str | None = None, formats=("md", "html"),
                  compare: str | None = None) -> None:  # fmt: skip
    """Write the report and show its summary table and where it is."""
    from loadbench.report.render import write_report

    report, written = write_report(results_dir, out_dir, formats, compare)
    for note in report.results.notes:
        stdout.print(f"[yellow]missing:[/yellow] {note}", highlight=False)
    for table in (report.summary, report.compare):
        if table is None:
            continue
        rich_table = Table(title=table.title)
        for i, column in enumerate(table.columns):
            rich_table.add_column(column, justify="left" if i == 0 else "right")
        for row in table.rows:
            rich_table.add_row(
                *(
                    c.replace("**", "") if "**" not in c else f"[bold]{c.strip('*')}[/bold]"
                    for c in row
                )
            )
        stdout.print(rich_table)
    if report.failed:
        stdout.print(f"[red]{len(report.failed.rows)} failed run(s)[/red] are listed in the report")
    for kind, path in written.items():
        stdout.print(f"report ({kind}): {path}", highlight=False)


def _rich_cell(text: str) -> str:
    """Markdown bold (the fastest format) as rich markup."""
    return f"[bold]{text[2:-2]}[/bold]" if text.startswith("**") and text.endswith("**") else text


@app.command()
def report(
    results_dir: Annotated[str, typer.Argument(help="A results directory of loadbench bench.")],
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Where to write (RESULTS_DIR/report).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="md, html, or md,html.")] = "md,html",
    compare: Annotated[
        str | None, typer.Option(help="Another results directory to put side by side.")
    ] = None,
) -> None:
    """Turn a results directory into report.md and a self-contained report.html.

    Examples:
      [bold]loadbench report results/default[/bold]
      [bold]loadbench report results/laptop --compare results/server --out report-both[/bold]
    """
    formats = tuple(f.strip() for f in format.split(",") if f.strip())
    unknown = sorted(set(formats) - {"md", "html"})
    if unknown or not formats:
        raise LoadbenchError(f"--format {format!r}: choose md, html or md,html")
    _print_report(results_dir, out_dir, formats, compare)


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
