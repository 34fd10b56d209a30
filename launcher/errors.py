"""How every maml-ds command reports a user error: one red line on stderr, exit code 2.

A traceback is printed only in debug mode (`--debug`, or MAML_DS_DEBUG=1, which the ranks a
launcher starts inherit); an exception that is not a user error is an internal bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console

from maml_ds.config import ConfigError

err_console = Console(stderr=True)

DEBUG_ENV = "MAML_DS_DEBUG"


def set_debug(enabled: bool) -> None:
    """Debug mode for this process and the processes it starts."""
    if enabled:
        os.environ[DEBUG_ENV] = "1"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = 2, *, error: BaseException | None = None) -> typer.Exit:
    """Print a user-facing error (no traceback, no hard wrapping) and return the Exit to raise.

    In debug mode `error` (default: the exception being handled, if any) is printed first.
    """
    error = error if error is not None else sys.exc_info()[1]
    if debug_enabled() and error is not None:
        traceback.print_exception(error)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_error(err: Exception, code: int = 2) -> typer.Exit:
    """`fail` for a user-error exception; a plain ConfigError of one problem is that one line
    (without the "invalid configuration" header)."""
    one = type(err) is ConfigError and len(err.problems) == 1
    return fail(err.problems[0] if one else str(err), code, error=err)  # type: ignore[attr-defined]
