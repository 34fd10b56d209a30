"""Evaluation progress: a rich bar on a terminal, plain log lines otherwise.

rich draws nothing into a file or a pipe (a SLURM log, DeepSpeed's launcher), so there a line
`pairs done/total, sequences, elapsed, ETA` is printed every `every_pairs` pairs or
`every_seconds` seconds, and once at the end. docs/evaluation.md ("Progress").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from maml_ds.progress import format_duration, rich_bar

__all__ = ["EvalProgress", "ProgressOptions", "format_duration"]


@dataclass(frozen=True)
class ProgressOptions:
    """How often progress lines are printed when the output is not a terminal."""

    every_pairs: int = 10
    """A log line after every N (task, seed) pairs (when the output is not a terminal)."""
    every_seconds: float = 60.0
    """... and at least every T seconds while a pair is being scored."""


class EvalProgress:
    """Counts sequences (option prompts) and (task, seed) pairs; shows them as a bar on a
    terminal, as log lines elsewhere. The ETA uses the sequences scored in this run only:
    pairs read from the cache take no time and would make it optimistic."""

    def __init__(
        self,
        description: str,
        *,
        num_pairs: int,
        num_sequences: int,
        options: ProgressOptions,
        enabled: bool = True,
        stream: TextIO | None = None,
        is_terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.console import Console

        self.description = description
        self.num_pairs = num_pairs
        self.num_sequences = num_sequences
        self.options = options
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        console = Console(file=self.stream)
        self.is_terminal = console.is_terminal if is_terminal is None else is_terminal
        self.clock = clock
        self.pairs_done = 0
        self.sequences_scored = 0
        self.sequences_cached = 0
        self._started = clock()
        self._last_line = self._started
        self._bar: Any = None
        self._bar_task: Any = None
        if enabled and self.is_terminal:
            self._bar = rich_bar(console, "sequences")

    def __enter__(self) -> EvalProgress:
        self._started = self._last_line = self.clock()
        if self._bar is not None:
            self._bar.__enter__()
            self._bar_task = self._bar.add_task(self.description, total=self.num_sequences)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            self._log("done")

    def describe(self, text: str) -> None:
        """What is being scored now (the bar's label)."""
        if self._bar is not None:
            self._bar.update(self._bar_task, description=text)

    def scored(self, num_sequences: int) -> None:
        """`num_sequences` option prompts scored (called per batch)."""
        self.sequences_scored += num_sequences
        self._advance(num_sequences)
        if self.clock() - self._last_line >= self.options.every_seconds:
            self._log()

    def pair_done(self, *, cached_sequences: int = 0) -> None:
        """A (task, seed) finished; `cached_sequences`: its sequences, when read from the cache."""
        self.sequences_cached += cached_sequences
        self._advance(cached_sequences)
        self.pairs_done += 1
        if self.pairs_done < self.num_pairs and (
            self.pairs_done % self.options.every_pairs == 0
            or self.clock() - self._last_line >= self.options.every_seconds
        ):
            self._log()

    def _advance(self, num_sequences: int) -> None:
        if self._bar is not None and num_sequences:
            self._bar.advance(self._bar_task, num_sequences)

    def line(self, final: str = "") -> str:
        """The log line: pairs, sequences, elapsed, ETA (or `final` in place of the ETA)."""
        elapsed = self.clock() - self._started
        done = self.sequences_scored + self.sequences_cached
        percent = 100.0 * done / self.num_sequences if self.num_sequences else 100.0
        if final:
            tail = final
        elif self.sequences_scored:
            left = self.num_sequences - done
            tail = "ETA " + format_duration(elapsed * left / self.sequences_scored)
        else:
            tail = "ETA ?"
        return (
            f"{self.description}: {self.pairs_done}/{self.num_pairs} pairs, "
            f"{done}/{self.num_sequences} sequences ({percent:.1f}%), "
            f"elapsed {format_duration(elapsed)}, {tail}"
        )

    def _log(self, final: str = "") -> None:
        if not self.enabled or self._bar is not None:
            return
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {self.line(final)}", file=self.stream, flush=True)
        self._last_line = self.clock()
