"""Thin helpers around DeepSpeed's own distributed set-up (no home-made comm)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import deepspeed
import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed() -> None:
    """``deepspeed.init_distributed`` that also works as one plain process.

    Under DeepSpeed's launcher the rank variables are set; a plain ``python``/``maml-ds train``
    process gets a world of one on localhost (DeepSpeed would otherwise try MPI discovery).
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    deepspeed.init_distributed(verbose=False)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Barrier + destroy: without it a ZeRO-3 run once died at exit ("terminate called without
    an active exception", DeepSpeed 0.19.8, after all work had passed). Each CPU rank also
    removes its shared-memory all-reduce buffer, which DeepSpeed never unlinks (66 MB of
    /dev/shm per rank and run, until the machine runs out of memory)."""
    if dist.is_initialized():
        dist.barrier()  # every rank has mapped every buffer: the names can go
        _unlink_cpu_allreduce_buffer()
        dist.destroy_process_group()


def _unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU shm all-reduce names its buffer deepspeed_allreduce_buffer_{uid}_{master
    address}_{master port}_{rank} (deepspeed/ops/csrc/cpu/comm/shm.cpp, 0.19.8)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None or not hasattr(os, "getuid"):
        return
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass  # not a CPU run, or no shm buffer (one rank)


def all_reduce_sum(value: float | torch.Tensor) -> float:
    t = torch.as_tensor(value, dtype=torch.float64).clone().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t.item())


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and saves a tokenizer), the others after."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def device() -> torch.device:
    accel = deepspeed.get_accelerator()
    name = accel.device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, accel.current_device())
