"""Training progress: a rich bar on a terminal, plain log lines otherwise.

rich draws nothing into a file or a pipe (a SLURM log, DeepSpeed's launcher), so there one line
`update N/total, loss, lr, prompts/s, elapsed, ETA` is printed every `log_every` updates (and
after the first and the last update of this invocation). Rank 0 only. docs/launch.md ("Logs").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from maml_ds.progress import format_duration, rich_bar

__all__ = ["TrainProgress", "format_duration"]


class TrainProgress:
    """Updates `start`..`last` of a run of `total` updates; the ETA is measured on this
    invocation's updates (a resumed run's earlier ones took no time here)."""

    def __init__(
        self,
        description: str,
        *,
        total: int,
        start: int,
        last: int,
        log_every: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        is_terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.console import Console

        self.description = description
        self.total, self.start, self.last = total, start, last
        self.log_every = log_every
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        console = Console(file=self.stream)
        self.is_terminal = console.is_terminal if is_terminal is None else is_terminal
        self.clock = clock
        self._started = clock()
        self._bar: Any = (
            rich_bar(console, "{task.fields[info]}") if enabled and self.is_terminal else None
        )
        self._bar_task: Any = None

    def __enter__(self) -> TrainProgress:
        self._started = self.clock()
        if self._bar is not None:
            self._bar.__enter__()
            self._bar_task = self._bar.add_task(
                self.description, total=self.total, completed=self.start, info=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(
        self, step: int, *, loss: float, lr: float, prompts_per_s: float, extra: Mapping[str, float]
    ) -> None:
        """Update `step` done (1-based) with its loss, the lr now and the throughput so far."""
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  lr {lr:.3g}  {prompts_per_s:.1f} prompts/s" + "".join(
            f"  {k} {v:.4g}" for k, v in extra.items()
        )
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=step, info=info)
        elif step == self.start + 1 or step % self.log_every == 0 or step == self.last:
            print(
                f"[{time.strftime('%H:%M:%S')}] {self.line(step, info)}",
                file=self.stream,
                flush=True,
            )

    def line(self, step: int, info: str) -> str:
        elapsed = self.clock() - self._started
        done = step - self.start
        eta = format_duration(elapsed * (self.last - step) / done) if done > 0 else "?"
        return (
            f"{self.description} update {step}/{self.total}  {info}  "
            f"elapsed {format_duration(elapsed)}  ETA {eta}"
        )
