"""Evaluation across ranks: which rank scores which (task, seed), and the results gathered.

Under DeepSpeed's launcher every rank loads the model and the data, scores its share of the
(task, seed) pairs (a balanced split by sequence count, the same on every rank), writes their
cache files, and receives every rank's results (`all_gather_object`), so rank 0 writes the same
result file as one process. docs/evaluation.md ("Across ranks").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["COLLECTIVE_TIMEOUT", "assign_ranks", "gather", "init_ranks", "launched_world_size"]

COLLECTIVE_TIMEOUT = timedelta(hours=24)
"""A rank that finishes its share first waits in the gather for the slowest one; DeepSpeed's
default (10 minutes) would kill a real evaluation. A crashed rank ends the job through the
launcher, not through this timeout."""


def launched_world_size() -> int:
    """The number of ranks the launcher started (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(device: str | None) -> str | None:
    """Join the launcher's process group (a no-op for one process); the device this rank
    scores on: the accelerator of its local rank, or `device` when one was given."""
    if launched_world_size() == 1 or dist.is_initialized():
        return device
    import deepspeed

    deepspeed.init_distributed(verbose=False, timeout=COLLECTIVE_TIMEOUT)
    accelerator = deepspeed.get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = accelerator.device_name()
    if device not in (None, name) or name == "cpu":
        return device or "cpu"
    accelerator.set_device(local_rank)
    return f"{name}:{local_rank}"


def assign_ranks(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank of each unit of work: the most costly first, each to the least loaded rank
    (ties: the lower rank, then the earlier unit). Deterministic, so every rank computes the
    same split without talking to the others."""
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (one process: `[value]`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
