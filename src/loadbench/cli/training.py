"""The training commands: `train`, `lr-find`, `predict`, `models`. Their flags are made from the
training options' declarations (`training/config.py` lists where each lives)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from loadbench.cli.app import app, stdout, table
from loadbench.cli.params import with_flags
from loadbench.errors import LoadbenchError, writable_folder
from loadbench.training.config import GROUPS
from loadbench.training.optim import SCHEDULE_OPTIONS

DataArg = Annotated[
    str | None,
    typer.Argument(help="A store (from loadbench convert) or a source spec, e.g. digits."),
]
Config = Annotated[str | None, typer.Option(help="A YAML file of these options (flags win).")]
# lr-find sweeps the lr itself and trains no whole run: no schedule, epochs or run directory;
# it sweeps with torch, eagerly.
NOT_FOR_LR_FIND = ("lr", *SCHEDULE_OPTIONS, "epochs", "early_stopping", "kfold", "out",
                   "overfit_batch", "smooth", "compile", "framework", "graph")  # fmt: skip


@app.command()
@with_flags(*GROUPS)
def train(
    data: DataArg = None,
    config: Config = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run in this directory.")] = None,
    **options: Any,
) -> None:
    """Train a classifier from a store or a source; writes history, metrics, curves and the model.

    Examples:
      [bold]loadbench train digits --model cnn-blocks --head gap --epochs 15[/bold]
      [bold]loadbench train stores/cifar-npy --model cnn-tiny --optimizer sgd --lr 0.001 --momentum 0.9 --epochs 150[/bold]
      [bold]loadbench train stores/cifar-hdf5 --model cnn-blocks --batch-norm --dropout 0.1,0.2,0.3,0.4 --schedule onecycle --augment flip,crop[/bold]
      [bold]loadbench train --resume runs/20261122-101500-cnn-blocks --epochs 30[/bold]
      [bold]loadbench train stores/digits-tfrecord --framework keras --graph xla --epochs 5[/bold]  (Keras 3 on TensorFlow: writes model.keras)
      [bold]torchrun --nproc-per-node 2 -m loadbench train stores/npy-uint8 --epochs 3[/bold]  (DDP: gloo on CPU, nccl on CUDA)
    """
    from loadbench import progress
    from loadbench.training.config import load_config
    from loadbench.training.distributed import is_main_process
    from loadbench.training.train import resume_config, summary_line
    from loadbench.training.train import train as run_training

    options["data"] = data
    cfg = resume_config(resume, **options) if resume else load_config(config, **options)
    if cfg.framework == "keras":
        _train_keras(cfg, resume)
        return
    with progress.enabled():
        if cfg.overfit_batch:
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


def _train_keras(cfg, resume: str | None) -> None:
    from loadbench import progress
    from loadbench.frameworks.keras_train import train_keras
    from loadbench.training.train import summary_line

    if resume:
        raise LoadbenchError(
            f"--resume {resume}: a Keras run keeps no checkpoint to continue from (only torch "
            "runs do); train it again with another --out"
        )
    with progress.enabled():
        result = train_keras(cfg)
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
@with_flags(*GROUPS, exclude=NOT_FOR_LR_FIND)
def lr_find_command(
    data: DataArg = None,
    start_lr: Annotated[float, typer.Option(help="First lr of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last lr of the sweep.")] = 10.0,
    iterations: Annotated[int, typer.Option(help="Batches in the sweep.")] = 100,
    out: Annotated[str, typer.Option(help="Directory for lr_find.png and lr_find.csv.")] = ".",
    config: Config = None,
    **options: Any,
) -> None:
    """Sweep the learning rate exponentially over batches; plot the loss and suggest an lr.

    Example: [bold]loadbench lr-find stores/cifar-npy --model cnn-blocks --batch-norm --optimizer sgd --out runs/lrf[/bold]
    """
    from loadbench import progress
    from loadbench.training.config import load_config
    from loadbench.training.loop import Run
    from loadbench.training.lr_find import describe, lr_find, write_lr_find

    if iterations < 5 or not 0 < start_lr < end_lr:
        raise LoadbenchError("lr-find needs 0 < --start-lr < --end-lr and --iterations >= 5")
    cfg = load_config(config, data=data, **options)
    if cfg.framework != "torch":
        raise LoadbenchError(f"lr-find sweeps with torch; {config} asks for {cfg.framework}")
    writable_folder(out, "writing the lr sweep to")  # before the sweep, not after it
    with progress.enabled(), Run(cfg) as run:
        result = lr_find(run, start_lr, end_lr, iterations)
    png = write_lr_find(result, out)
    stdout.print(f"{describe(result)}\nplot: {png}")


@app.command()
def predict(
    model_file: Annotated[str, typer.Argument(help="A model.pt written by loadbench train.")],
    images: Annotated[list[str], typer.Argument(help="Image files of any size.")],
    top: Annotated[int, typer.Option(help="Classes to show per image.")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    resize: Annotated[
        str,
        typer.Option(
            help="auto: the training scale (models with a GAP head keep the aspect ratio, the "
            "shorter side becomes the training size; others: as train); train: resized and "
            "centre-cropped to the training size; none: the image's own size (GAP head only)."
        ),
    ] = "auto",
) -> None:
    """Classify image files with a trained model and print the top classes with probabilities.

    Example: [bold]loadbench predict runs/digits/model.pt photo.png scan-28x32.png[/bold]
    """
    from loadbench.training.predict import predict_files

    for p in predict_files(model_file, images, top=top, device=device, resize=resize):
        h, w = p.size
        ranked = ", ".join(f"{name} {prob:.1%}" for name, prob in p.top)
        stdout.print(f"{p.path} ({h}x{w}): {ranked}", highlight=False)


@app.command()
@with_flags(GROUPS[0], exclude=("model",))
def models(
    input_shape: Annotated[str, typer.Option("--input", help="Image size HxWxC.")] = "32x32x3",
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 10,
    **options: Any,
) -> None:
    """List the models with their parameter counts for an input shape (and any model options).

    Examples:
      [bold]loadbench models --input 28x28x1 --classes 10[/bold]
      [bold]loadbench models --filters 20[/bold]                  (cnn-tiny with 20 filters per conv)
    """
    from loadbench.training.models import models_table

    try:
        h, w, c = (int(v) for v in input_shape.lower().split("x"))
    except ValueError:
        raise LoadbenchError(f"--input {input_shape!r} is not HxWxC, e.g. 32x32x3") from None
    columns = ["model", "what", "parameters", "options (defaults)"]
    shown = table(f"Models for {h}x{w}x{c} images, {classes} classes", columns, ("parameters",))
    given = {k: v for k, v in options.items() if v is not None}
    for name, summary, count, text in models_table((c, h, w), classes, **given):
        shown.add_row(name, summary, f"{count:,}", text)
    stdout.print(shown)
