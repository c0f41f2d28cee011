"""Rich progress bars for every long step, switched on by the CLI and off in library use."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("loadbench_progress", default=False)
_active: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "loadbench_progress_active", default=None
)
_notes: contextvars.ContextVar[bool] = contextvars.ContextVar("loadbench_notes", default=False)


def make_console(stderr: bool = False) -> Console:
    """A rich console; 160 columns wide when it writes to a file or pipe, where rich's default
    80 would cut paths in tables and wrap epoch lines in logs."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


console = make_console(stderr=True)


@contextlib.contextmanager
def enabled(on: bool | None = None) -> Iterator[None]:
    """Show progress bars for the steps run inside this block (default: when on a terminal),
    and `note`s (always)."""
    token = _enabled.set(console.is_terminal if on is None else on)
    notes = _notes.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)
        _notes.reset(notes)


def note(text: str) -> None:
    """A one-line note for the user on stderr, inside `enabled` (the CLI); silent in library
    use, like the progress bars."""
    if _notes.get():
        console.print(f"[yellow]note:[/yellow] {text}")


@contextlib.contextmanager
def task(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar for one step; yields `advance(n)`. A no-op unless progress is enabled.

    Nested steps share one live display, so a conversion shows its source decoding and its
    writing as two bars rather than fighting over the terminal.
    """
    if not _enabled.get():
        yield lambda n=1: None
        return
    outer = _active.get()
    if outer is not None:
        task_id = outer.add_task(description, total=total)
        try:
            yield lambda n=1: outer.advance(task_id, n)
        finally:
            outer.remove_task(task_id)
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with bar:
        token = _active.set(bar)
        task_id = bar.add_task(description, total=total)
        try:
            yield lambda n=1: bar.advance(task_id, n)
        finally:
            _active.reset(token)
