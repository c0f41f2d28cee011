"""The `loadbench` command line. Every command has --help with an example.

Commands live by group (`data.py`, `training.py`, `bench.py`) on one typer app (`app.py`); their
option flags are made from the options' declarations (`params.py`). Errors about the user's
input end as one line on stderr and exit code 2 (`--debug` shows the traceback); heavy modules
are imported inside commands so `--help` stays fast.
"""

from __future__ import annotations

import sys

from loadbench.cli.app import app, err, state
from loadbench.errors import LoadbenchError, explain_os_error

# The command modules register their commands on `app`, in the order `--help` lists them.
# isort: off
from loadbench.cli import data  # noqa: E402, F401
from loadbench.cli import training  # noqa: E402, F401
from loadbench.cli import bench  # noqa: E402, F401
# isort: on


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    try:
        try:
            app()
        except OSError as e:  # a full disk, a read-only or forbidden place: the user's to fix
            explained = explain_os_error(e)
            if explained is None:
                raise
            raise explained from e
    except LoadbenchError as e:
        if state["debug"]:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except SystemExit as e:  # typer ends a Ctrl-C as exit 130 silently
        if e.code == 130 and _caused_by(e, KeyboardInterrupt):
            err.print("[yellow]interrupted[/yellow]")
        raise
    except Exception as e:  # a bug, not bad input: say so, keep the traceback for --debug
        if state["debug"]:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {e} (run again with --debug for the "
            "traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


if __name__ == "__main__":
    main()
