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
def task(description: str, total: int | None, *,
         average_over_s: float = 30.0) -> Iterator[Callable[..., None]]:  # fmt: skip
    """A progress bar for one step; yields `advance(n, total=None)` (a new `total` when the
    step grows or shrinks as it goes). A no-op unless progress is enabled.

    Nested steps share one live display, so a conversion shows its source decoding and its
    writing as two bars rather than fighting over the terminal. The time remaining is from
    the rate over the last `average_over_s` (of the outermost bar): a bench whose runs take
    minutes each needs it longer than rich's 30 s to show one.
    """
    if not _enabled.get():
        yield lambda n=1, total=None: None
        return
    outer = _active.get()
    if outer is not None:
        task_id = outer.add_task(description, total=total)
        try:
            yield _advancer(outer, task_id)
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
        speed_estimate_period=average_over_s,
    )
    with bar:
        token = _active.set(bar)
        task_id = bar.add_task(description, total=total)
        try:
            yield _advancer(bar, task_id)
        finally:
            _active.reset(token)


def _advancer(bar: Progress, task_id) -> Callable[..., None]:
    """`advance(n, total=None)` of one task of `bar`."""
    (task,) = [t for t in bar.tasks if t.id == task_id]

    def advance(n: int = 1, total: int | None = None) -> None:
        if total is not None:  # not update(total=...): that forgets the rate, and the ETA
            task.total = total
        bar.advance(task_id, n)

    return advance
