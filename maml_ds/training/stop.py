"""Why a run stops before ``max_steps`` on purpose, always with a checkpoint: the typed errors the
CLI turns into exit codes, and the pre-emption signals every rank listens for.

A signal only sets a flag; the ranks agree on it through one all-reduce per update, so every
rank finishes the same update, saves the same checkpoint and stops: none is left waiting in a
collective. Exit codes and the whole story: docs/reliability.md.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from maml_ds import distributed as D

__all__ = [
    "EXIT_NON_FINITE",
    "EXIT_PREEMPTED",
    "PREEMPTION_SIGNALS",
    "NonFiniteStop",
    "Preempted",
    "PreemptionWatch",
    "RunStopped",
]

EXIT_NON_FINITE = 3
"""Too many consecutive skipped updates (non-finite loss or gradient): the run diverged."""
EXIT_PREEMPTED = 75
"""Stopped by SIGTERM / SIGUSR1 after saving (EX_TEMPFAIL: run the same command with --resume)."""
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):
    """The run stopped early and saved ``checkpoint``; the CLI exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteStop(RunStopped):
    exit_code = EXIT_NON_FINITE


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class PreemptionWatch:
    """While active, SIGTERM / SIGUSR1 on this rank only set a flag (the previous handlers come
    back on exit). ``requested()`` is a collective: call it on every rank once per update."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def requested(self) -> str | None:
        """The name of a signal some rank received since the start (the same on every rank)."""
        flag = torch.tensor([float(self.received)], device=D.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
