"""Helpers to run maml-ds commands and DeepSpeed workers in subprocesses (tests only)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free port for a run's master. DeepSpeed's CPU all-reduce never unlinks the 66 MB
    /dev/shm buffer each rank creates, named after this port: removed when the tests end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    atexit.register(remove_shm_buffers, port)
    return port


def remove_shm_buffers(port: int) -> None:
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        path.unlink(missing_ok=True)


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    out.pop("RANK", None)
    out.pop("WORLD_SIZE", None)
    out.pop("LOCAL_RANK", None)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def run(
    args: list[str], *, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def maml_ds(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("maml-ds", path=str(BIN)) or "maml-ds"
    return run([exe, *map(str, args)], check=check, timeout=timeout)


def deepspeed_run(
    script: str | Path, *args: str, num_ranks: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N script args`` on CPU ranks (gloo)."""
    exe = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
    return run(
        [
            exe,
            "--num_gpus",
            str(num_ranks),
            "--master_port",
            str(free_port()),
            str(script),
            *map(str, args),
        ],
        timeout=timeout,
    )


def python_run(script: str | Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, str(script), *map(str, args)], timeout=timeout)
