"""Command-line flags made from option declarations (`loadbench.options`).

`@with_flags(group, ...)` gives a command one flag per declared option (`--chunk-images`,
`--batch-norm/--no-batch-norm`), in the group's `--help` panel, with help that says whose option
it is, what it takes and its default. The values arrive in the command's `**options`, None for
a flag not given, so the declaration's default applies where the option is resolved.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from loadbench.options import Option, OptionGroup


def with_flags(*groups: OptionGroup, exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator: the command takes a flag for every option of `groups` (but `exclude`). Two
    options of one name, or an option named like one of the command's own parameters, is a
    programming error, raised when the command is defined."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in params}
        for group in groups:
            for name, owners in group.options.items():
                if name in exclude:
                    continue
                if name in taken:
                    raise TypeError(f"{command.__name__}: two options named {name!r}")
                params.append(flag(name, owners, group.title))
                taken.add(name)
        command.__signature__ = signature.replace(parameters=params)
        return command

    return decorate


def flag(name: str, owners: dict[str, Option], panel: str) -> inspect.Parameter:
    """The typer parameter of option `name`, declared by `owners` ({owner: Option})."""
    kind = cli_kind(owners)
    dashed = "--" + name.replace("_", "-")
    names = (f"{dashed}/--no-{dashed[2:]}",) if kind is bool else (dashed,)
    info = typer.Option(*names, help=flag_help(owners), rich_help_panel=panel, show_default=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, info]
    )


def cli_kind(owners: dict[str, Option]) -> type:
    """The type a flag parses: the options' own when they agree on one, else text (checked
    where the option is resolved)."""
    kinds = {str if option.parse is not None else option.kind for option in owners.values()}
    return kinds.pop() if len(kinds) == 1 else str


def flag_help(owners: dict[str, Option]) -> str:
    """`help: choices (default)`, prefixed with whose option it is: `hdf5: ...; zarr: ...`.
    Owners that declare it alike share one entry (`files-jpeg/webdataset: ...`)."""
    entries: dict[str, list[str]] = {}
    for owner, option in owners.items():
        entries.setdefault(option.describe(), []).append(owner)
    parts = []
    for text, names in entries.items():
        whose = ", ".join(n for n in names if n)
        parts.append(f"{whose}: {text}" if whose else text)
    return "; ".join(parts) + "."


def given(options: dict[str, Any], group: OptionGroup) -> dict[str, Any]:
    """The options of `group` that were given on the command line."""
    return {k: v for k, v in options.items() if k in group.options and v is not None}
