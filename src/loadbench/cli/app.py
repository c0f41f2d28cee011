"""The typer app every command registers on, its consoles, and what commands print alike."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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
state = {"debug": False}


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    state["debug"] = debug
    if version:
        from loadbench.version import __version__

        stdout.print(f"loadbench {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:  # `loadbench --debug` alone: what there is to run
        stdout.print(ctx.get_help())
        raise typer.Exit()


def table(title: str, columns: list[str], right: tuple[str, ...] = ()) -> Table:
    """A rich table with `columns`; those in `right` are right-aligned."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="right" if column in right else "left")
    return out


def short(store_path: str, given: str) -> str:
    """A store's path relative to the folder or URL prefix the user gave."""
    from loadbench.remote import is_url

    if is_url(store_path) or is_url(given):
        rel = store_path[len(given.rstrip("/")) :].lstrip("/")
        return rel or store_path.rstrip("/").rsplit("/", 1)[-1]
    given = os.path.abspath(os.path.expanduser(given))
    rel = os.path.relpath(store_path, given)
    return os.path.basename(store_path) if rel == "." else rel


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
