"""The one exception type that loadbench raises for a person to read."""

from __future__ import annotations


class LoadbenchError(Exception):
    """A problem with the user's input or data: what went wrong, where, and what to do.

    The CLI prints the message on one line and exits with a non-zero code; no traceback unless
    `--debug` is given.
    """


class CorruptStoreError(LoadbenchError):
    """A store exists but its files do not match its manifest (truncated, missing, altered)."""
