"""Run the DeepSpeed runner in its own process group and pass it the signals `launch` gets.

DeepSpeed's runner (0.19) forwards signals only on multi-node pdsh launches and otherwise dies
of a SIGTERM, leaving its per-node launcher and the ranks running; its per-node launcher
(`deepspeed.launcher.launch`) SIGTERMs the ranks and SIGKILLs them 30 s later. So a signal goes
to the whole group. docs/launch.md ("Signals").
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from rich.console import Console

__all__ = ["FORWARDED_SIGNALS", "run_forwarding_signals"]

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Signals `launch` passes to the DeepSpeed runner's process group (the ranks included)."""


def run_forwarding_signals(argv: list[str], env: dict[str, str], console: Console) -> int:
    """Run the DeepSpeed runner in its own process group; pass it FORWARDED_SIGNALS.

    DeepSpeed's runner forwards signals only on multi-node pdsh launches, and dies of a SIGTERM
    otherwise, leaving its per-node launcher and the ranks running: so the signal goes to the
    whole group (runner, per-node launcher, ranks), and also when the runner alone was
    signalled. Returns its exit code, or 128 + the signal when a signal ended it.
    """
    runner = subprocess.Popen(argv, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        console.print(f"launch: {signal.Signals(signum).name} passed to the ranks", highlight=False)
        _signal_group(runner.pid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = runner.wait()
        if code < 0 and not received:  # the runner itself was signalled, not through us
            received.append(-code if -code in FORWARDED_SIGNALS else signal.SIGTERM)
            _signal_group(runner.pid, received[-1])
        if received:
            _wait_for_group(runner.pid)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code < 0:
        return 128 - code
    return 128 + received[-1] if received and code == 0 else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _wait_for_group(pgid: int, poll_s: float = 0.5) -> None:
    """Until no live process of the group is left (the ranks finish their update and save).

    Zombies do not count: an orphaned rank's new parent may never reap it.
    """
    import psutil

    def alive() -> bool:
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (OSError, psutil.Error):
                continue
        return False

    while alive():
        time.sleep(poll_s)
