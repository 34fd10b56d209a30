"""Runs a plan's steps as subprocesses, one at a time, and records each one that finished.

state.json marks a step finished only after its outputs exist, written atomically; a rerun
skips finished steps whose command is unchanged and whose outputs are still there, redoes the
others (a training with checkpoints continues with `--resume`), and a step that runs again
first unmarks every step that depends on it. docs/study.md ("Resuming").
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maml_ds.files import write_atomic
from maml_ds.study.plan import Step

__all__ = [
    "STATE_FILE",
    "StepFailed",
    "StudyInterrupted",
    "StudyState",
    "command_line",
    "log_path",
    "run_steps",
    "step_argv",
]

STATE_FILE = "state.json"
STATE_FORMAT = "maml-ds-study-state"
LOGS = "logs"


@dataclass
class StudyState:
    """Finished steps: id -> {"argv", "seconds", "finished_at"}."""

    path: Path
    finished: dict[str, dict[str, Any]]

    @staticmethod
    def load(out_dir: Path) -> StudyState:
        path = out_dir / STATE_FILE
        if not path.is_file():
            return StudyState(path, {})
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a maml-ds study state file")
        return StudyState(path, dict(raw["finished"]))

    def save(self) -> None:
        record = {"format": STATE_FORMAT, "finished": self.finished}
        write_atomic(self.path, json.dumps(record, indent=1) + "\n")

    def is_finished(self, step: Step) -> bool:
        entry = self.finished.get(step.id)
        return (
            entry is not None
            and entry["argv"] == list(step.argv)
            and all(Path(p).is_file() for p in step.outputs)
        )


class StepFailed(Exception):
    """A step exited with an error or without its outputs."""

    def __init__(self, step: Step, reason: str, log: Path, rerun: str):
        self.step, self.reason, self.log, self.rerun = step, reason, log, rerun
        super().__init__(f"step {step.id} {reason}; log: {log}; rerun it alone: {rerun}")


class StudyInterrupted(Exception):
    """A signal (or --stop-after) stopped the study between or during steps."""

    def __init__(self, message: str, code: int):
        self.code = code
        super().__init__(message)


def log_path(out_dir: Path, step: Step) -> Path:
    return out_dir / LOGS / f"{step.id}.log"


def _holds_checkpoints(run_dir: Path) -> bool:
    """The rule `maml-ds train` applies: such a run folder continues only with --resume."""
    from maml_ds.training import CHECKPOINTS, checkpoint

    return checkpoint.holds_checkpoints(run_dir / CHECKPOINTS)


def step_argv(step: Step) -> list[str]:
    """What runs: the plan's command, `--resume` for a training that left checkpoints."""
    argv = list(step.argv)
    if step.run_dir is not None and _holds_checkpoints(Path(step.run_dir)):
        argv.append("--resume")  # the last train option (after `--`)
    return argv


def _executable(argv: list[str]) -> list[str]:
    """The `maml-ds` console script of this environment in place of the plan's "maml-ds"."""
    local = Path(sys.executable).parent / argv[0]
    found = str(local) if local.is_file() else shutil.which(argv[0])
    return [found or argv[0], *argv[1:]]


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)


def _die_with_parent(study_pid: int) -> Callable[[], None]:
    """Linux: the child gets SIGTERM if the study dies (even of SIGKILL), so no step runs on
    unwatched; `maml-ds launch` passes it to the ranks, which checkpoint and stop."""

    def set_death_signal() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != study_pid:  # the study died before the call
                os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def _dependents(steps: list[Step], step_id: str) -> set[str]:
    """Every step that reads, directly or not, the outputs of `step_id`."""
    out: set[str] = set()
    frontier = {step_id}
    while frontier:
        frontier = {s.id for s in steps if set(s.needs) & frontier} - out
        out |= frontier
    return out


def _run_one(argv: list[str], log: Path) -> int:
    """Run `argv` with its output appended to `log`; SIGINT/SIGTERM to the study become a
    SIGTERM to the step (a training checkpoints), then StudyInterrupted."""
    log.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    with log.open("a", encoding="utf-8") as fh:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        fh.write(f"# {stamp} maml-ds study: {command_line(argv)}\n")
        fh.flush()
        child = subprocess.Popen(
            _executable(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C reaches the study only
            preexec_fn=_die_with_parent(os.getpid()),
        )

        def forward(signum: int, _frame: Any) -> None:
            received.append(signum)
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, forward) for s in handled}
        try:
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if received:
        name = signal.Signals(received[0]).name
        raise StudyInterrupted(f"{name}: stopped during a step (its log: {log})", 128 + received[0])
    return code


def run_steps(
    steps: list[Step],
    out_dir: Path,
    *,
    echo: Callable[[str], None],
    stop_after: int | None = None,
) -> int:
    """Run every unfinished step in order; returns the number run now.

    Raises StepFailed (the study stops at the first failure) or StudyInterrupted.
    """
    state = StudyState.load(out_dir)
    width = len(str(len(steps)))
    num_run = 0
    for i, step in enumerate(steps, start=1):
        counter = f"[{i:>{width}}/{len(steps)}]"
        if state.is_finished(step):
            echo(f"{counter} done earlier  {step.id}")
            continue
        if stop_after is not None and num_run >= stop_after:
            raise StudyInterrupted(f"stopped after {num_run} step(s) (--stop-after)", 3)
        stale = (_dependents(steps, step.id) | {step.id}) & set(state.finished)
        for step_id in stale:
            del state.finished[step_id]
        if stale:
            state.save()
        argv = step_argv(step)
        log = log_path(out_dir, step)
        started = time.perf_counter()
        code = _run_one(argv, log)
        seconds = time.perf_counter() - started
        rerun = command_line(argv)
        if code != 0:
            raise StepFailed(step, f"failed (exit code {code})", log, rerun)
        missing = [p for p in step.outputs if not Path(p).is_file()]
        if missing:
            raise StepFailed(step, f"exited 0 without writing {', '.join(missing)}", log, rerun)
        state.finished[step.id] = {
            "argv": list(step.argv),
            "seconds": round(seconds, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        state.save()
        num_run += 1
        resumed = " (resumed)" if argv != list(step.argv) else ""
        echo(f"{counter} {_duration(seconds):>8}  {step.id}{resumed}")
    return num_run


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
