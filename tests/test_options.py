"""One declaration per option: every option declared by a format, a peer, a model, a source, the
optimizer, the schedule or the training run is a CLI flag, shows in `--help` with its default,
is accepted by an experiment file, and is typed the same everywhere."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from loadbench.bench.experiment import MATRIX_KEYS, Experiment
from loadbench.cli.app import app
from loadbench.formats import list_formats
from loadbench.options import Option, OptionGroup, as_flag
from loadbench.sources import SOURCE_KINDS, source_options
from loadbench.sources.base import COMMON_OPTIONS
from loadbench.training.config import GROUPS, SOURCE_OPTION_KEYS, TrainConfig, load_config
from loadbench.training.models import list_models

# Values for options whose default says nothing about what they take.
EXAMPLES = {"remap": "a=0", "drop": "0", "augment": "flip", "milestones": "2,3", "device": "cpu",
            "size": "16", "eval_split": "test", "weights": "none", "resplit": "70,15,15",
            "graph": "compiled"}  # fmt: skip
SOURCE_OF = {"cifar10": "cifar10:/x", "cifar100": "cifar100:/x", "mnist": "mnist:/x",
             "fashion-mnist": "fashion-mnist:/x", "tiny-imagenet": "tiny-imagenet:/x",
             "folder": "folder:/x", "digits": "digits",
             "synthetic": "synthetic:cifar-like"}  # fmt: skip


def example(name: str, option: Option) -> Any:
    """A value the option takes."""
    if name in EXAMPLES:
        return EXAMPLES[name]
    if option.choices:
        return option.choices[-1]
    if option.default not in (None, [], ()):
        return option.default
    if option.kind is bool:
        return True
    if option.kind is float:
        return 0.5
    if option.kind is int:
        return int(max(option.minimum or 0, (option.above or 0) + 1, 2))
    return "x"


def cli_text(value: Any) -> list[str]:
    """How a value is written after its flag (bools are --flag / --no-flag)."""
    return (
        []
        if isinstance(value, bool)
        else [",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)]
    )


def cli_args(name: str, value: Any) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    if isinstance(value, bool) or (isinstance(value, str) and value in ("true", "false")):
        return [dashed if as_flag(value) else f"--no-{dashed[2:]}"]
    return [dashed, *cli_text(value)]


FORMAT_OPTIONS = [(f.name, k, o) for f in list_formats(peers=True) for k, o in f.options.items()]
MODEL_OPTIONS = [(m.name, k, o) for m in list_models() for k, o in m.options.items()]
SOURCE_OPTIONS = [("digits", k, o) for k, o in COMMON_OPTIONS.items()] + [
    (kind, k, o) for kind, own in source_options().items() for k, o in own.items()
]
TRAIN_OPTIONS = [(k, owners[""]) for g in GROUPS for k, owners in g.options.items() if "" in owners]


def ids(rows):
    return [f"{row[0]}-{row[1]}" if len(row) == 3 else row[0] for row in rows]


def parsed(command: str, args: list[str]) -> dict[str, Any]:
    """What the command line makes of `args` (parsed by the command, nothing run)."""
    import typer.main

    group = typer.main.get_command(app)
    cmd = group.commands[command]
    ctx = cmd.make_context(command, args, resilient_parsing=False)
    return ctx.params


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """`--help` of the commands with declared flags, one option to a line."""
    out = {}
    for command in ("convert", "stats", "train", "lr-find"):
        shown = subprocess.run(
            [sys.executable, "-m", "loadbench", command, "--help"], capture_output=True,
            text=True, env={"COLUMNS": "3000", "TERMINAL_WIDTH": "3000", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        out[command] = shown.stdout
    return out


def help_line(text: str, name: str) -> str:
    flag = "--" + name.replace("_", "-")
    lines = [line for line in text.splitlines() if line.strip("│* ").startswith(f"{flag} ")]
    assert lines, f"{flag} is not in --help"
    return " ".join(lines[0].split())


# -- formats and peers --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,name,option", FORMAT_OPTIONS, ids=ids(FORMAT_OPTIONS))
def test_format_options(helps, fmt, name, option):
    line = help_line(helps["convert"], name)
    assert fmt in line and f"({option.default_text})" in line
    value = example(name, option)
    params = parsed("convert", ["digits", "-f", fmt, "-o", "x", *cli_args(name, value)])
    from loadbench.formats import get_format

    assert get_format(fmt).parse_options({name: params[name]})[name] is not None
    Experiment.model_validate(
        {
            "datasets": [{"source": "digits"}],
            "formats": [fmt],
            "format_options": {fmt: {name: params[name]}},
        }  # fmt: skip
    )


def test_a_bad_format_option_in_an_experiment_is_refused():
    with pytest.raises(ValueError, match="hdf5 has no option|format hdf5 has no option shard"):
        Experiment.model_validate(
            {"datasets": [{"source": "digits"}], "format_options": {"hdf5": {"shard_size": 3}}}
        )


# -- models ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,name,option", MODEL_OPTIONS, ids=ids(MODEL_OPTIONS))
def test_model_options(helps, model, name, option):
    line = help_line(helps["train"], name)
    assert model in line and f"({option.default_text})" in line
    value = example(name, option)
    params = parsed("train", ["digits", "--model", model, *cli_args(name, value)])
    config = load_config(None, **params)
    assert config.model_options() == {name: params[name]}
    from loadbench.training.models import resolve_model_options

    resolve_model_options(model, config.model_options())
    Experiment.model_validate(
        {"datasets": [{"source": "digits"}], "train": {"model": model, name: params[name]}}
    )


def test_a_bad_model_option_in_an_experiment_is_refused():
    with pytest.raises(ValueError, match="model 'cnn-blocks' option widths='8,0'"):
        Experiment.model_validate(
            {"datasets": [{"source": "digits"}], "train": {"model": "cnn-blocks", "widths": "8,0"}}
        )


# -- sources ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,name,option", SOURCE_OPTIONS, ids=ids(SOURCE_OPTIONS))
def test_source_options(helps, kind, name, option):
    for command in ("convert", "stats"):
        line = help_line(helps[command], name)
        assert f"({option.default_text})" in line
    value = example(name, option)
    params = parsed("stats", [SOURCE_OF[kind], *cli_args(name, value)])
    SOURCE_KINDS[kind].options.model_validate({name: params[name]})
    Experiment.model_validate(
        {"datasets": [{"source": SOURCE_OF[kind], "options": {name: params[name]}}]}
    )


def test_a_bad_source_option_in_an_experiment_is_refused():
    with pytest.raises(ValueError, match="source digits: unknown option 'size'"):
        Experiment.model_validate({"datasets": [{"source": "digits", "options": {"size": 8}}]})


# -- the training run: optimizer, schedule, loaders, order, augmentation, splits, run -------------


@pytest.mark.parametrize("name,option", TRAIN_OPTIONS, ids=ids(TRAIN_OPTIONS))
def test_training_options(helps, name, option):
    line = help_line(helps["train"], name)
    assert f"({option.default_text})" in line
    value = example(name, option)
    params = parsed("train", ["digits", *cli_args(name, value)])
    config = load_config(None, **params)
    assert (
        getattr(config, name)
        == TrainConfig.model_validate({"data": "-", name: value}).model_dump()[name]
    )
    experiment = {"datasets": [{"source": "digits"}]}
    if name in SOURCE_OPTION_KEYS:  # a source option: experiments give it per dataset
        with pytest.raises(ValueError, match="are source options"):
            Experiment.model_validate({**experiment, "train": {name: params[name]}})
    elif name not in MATRIX_KEYS:
        Experiment.model_validate({**experiment, "train": {name: params[name]}})
    elif name in Experiment.model_fields:  # set by the matrix, at the top of the file
        field = Experiment.model_fields[name].annotation
        given = [params[name]] if "list" in str(field) else params[name]
        Experiment.model_validate({**experiment, name: given})
    else:  # a benchmark run sets it: refused under train:, with why
        with pytest.raises(ValueError, match="set by the matrix"):
            Experiment.model_validate({**experiment, "train": {name: params[name]}})


def test_every_option_of_a_command_has_one_flag():
    from loadbench.cli.params import with_flags

    group = OptionGroup.of("x", {"seed": Option(0, "a seed", kind=int)})

    def command(seed: int = 0, **options):
        pass

    with pytest.raises(TypeError, match="two options named 'seed'"):
        with_flags(group)(command)


def test_options_of_one_name_are_one_kind_of_flag():
    """Owners that share an option name share its flag: its type must fit all of them."""
    from loadbench.cli.params import cli_kind

    for group in (
        *GROUPS,
        OptionGroup.of("formats", owned={f.name: f.options for f in list_formats(peers=True)}),
    ):
        for name, owners in group.options.items():
            kinds = {o.kind for o in owners.values() if o.parse is None}
            assert len(kinds) <= 1 or cli_kind(owners) is str, name


# -- the declaration itself ------------------------------------------------------------------------


def test_an_option_types_and_checks_what_it_is_given():
    count = Option(3, "images", kind=int, minimum=1)
    assert count.coerce("5") == 5 and count.coerce(None) is None
    with pytest.raises(ValueError, match="must be at least 1"):
        count.coerce(0)
    with pytest.raises(ValueError, match="must be a whole number"):
        count.coerce("2.5")
    ratio = Option(None, "a share", kind=float, above=0, below=1)
    with pytest.raises(ValueError, match="must be less than 1"):
        ratio.coerce("1")
    codec = Option("none", "codec", choices=("none", "zstd"))
    with pytest.raises(ValueError, match=r"must be one of none\|zstd"):
        codec.coerce("lz4")
    labels = Option("fine", "labels", choices=("fine", "coarse"), choices_text="fine or coarse")
    with pytest.raises(ValueError, match="must be fine or coarse"):
        labels.coerce("medium")
    assert Option(False, "flag", kind=bool).coerce("yes") is True
    assert Option((1,), "ints", parse=lambda v: tuple(int(x) for x in str(v).split(","))).coerce(
        "2,3"
    ) == (2, 3)


def test_an_option_says_what_it_takes_and_its_default():
    assert Option("none", "codec", choices=("none", "zstd")).describe() == "codec: none|zstd (none)"
    assert Option(None, "chunk", kind=int, shown="about 1 MiB").describe() == "chunk (about 1 MiB)"
    assert Option((20, 40), "widths").describe() == "widths (20,40)"
    assert Option([], "augment").describe() == "augment (none)"


def test_a_pydantic_model_made_from_declarations_checks_like_the_option():
    from pydantic import ValidationError, create_model

    from loadbench.options import fields

    declared = {
        "epochs": Option(10, "epochs", kind=int, above=0),
        "optimizer": Option("adam", "optimizer", choices=("sgd", "adam")),
        "channels": Option(3, "channels", kind=int, choices=(1, 3), choices_text="1 or 3"),
        "widths": Option((8,), "widths", parse=lambda v: tuple(int(x) for x in str(v).split(","))),
        "drop": Option([], "drop", parse=lambda v: [] if v is None else str(v).split(",")),
    }
    model = create_model("M", **fields(declared))
    made = model.model_validate({"epochs": "3", "widths": "4,5", "drop": "a,b"})
    assert (made.epochs, made.optimizer, made.channels, made.widths) == (3, "adam", 3, (4, 5))
    assert made.drop == ["a", "b"] and model().drop == [] and model().drop is not model().drop
    for bad, message in (
        ({"epochs": 0}, "greater than 0"),
        ({"optimizer": "lion"}, "'sgd' or 'adam'"),
        ({"channels": 2}, "must be 1 or 3"),
    ):
        with pytest.raises(ValidationError, match=message):
            model.model_validate(bad)
