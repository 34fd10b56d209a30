"""How every maml-ds command reports a user error: one red line on stderr, exit code 2."""

from __future__ import annotations

import typer
from rich.console import Console

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error (no traceback, no hard wrapping) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
