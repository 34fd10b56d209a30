"""What training and evaluation progress share: durations and the rich bar drawn on a terminal
(off a terminal both print plain log lines instead; docs/launch.md "Logs")."""

from __future__ import annotations

from typing import Any

__all__ = ["format_duration", "rich_bar"]


def format_duration(seconds: float) -> str:
    """3725.2 -> "1:02:05"."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def rich_bar(console: Any, detail: str) -> Any:
    """A rich Progress: description, bar, done/total, ``detail`` (a TextColumn format), times."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(detail),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
