"""Checkpoints through DeepSpeed, with the state DeepSpeed does not keep.

``engine.save_checkpoint`` / ``load_checkpoint`` hold the model, the optimizer (the shared
moments), the LR schedule and the loss scaler. We add, in ``client_state``: the training
counters, the sampler position, the resolved config and every rank's RNG states (ZeRO 0-2 save
only rank 0's client_state, so per-rank entries are gathered into it).

The pointer to the newest checkpoint (``latest``) is written by us, atomically, only after
every rank has finished writing: a crash while saving leaves the last good checkpoint in place.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from maml_ds import distributed as D

LATEST = "latest"


class CheckpointError(FileNotFoundError):
    """A checkpoint that should exist does not, or is unreadable."""


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save(engine, ckpt_dir: str | Path, tag: str, client_state: dict[str, Any]) -> Path:
    """Save a checkpoint on every rank; publish it as ``latest`` once all ranks are done."""
    ckpt_dir = Path(ckpt_dir)
    states: list[Any] = [None] * D.world_size()
    if dist.is_initialized() and D.world_size() > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    state = dict(client_state, maml_ds_rng=states)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    D.barrier()
    if D.is_main():
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
    D.barrier()
    return ckpt_dir / tag


def load(engine, ckpt_dir: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Load ``tag`` (default: latest) into the engine; return our client state for this rank."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        found = (
            sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
        )
        raise CheckpointError(
            f"no checkpoint {'tag ' + repr(tag) + ' ' if tag else ''}in {ckpt_dir} "
            f"(found: {', '.join(found) or 'nothing'}); start without --resume, or point "
            "--out at the run folder that holds checkpoints/"
        )
    load_path, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None or client is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    states = client.get("maml_ds_rng")
    if states:
        set_rng_state(states[min(D.rank(), len(states) - 1)])
    return client
