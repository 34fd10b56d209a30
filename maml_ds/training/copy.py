"""Copy pre-training (``--method copy``, `maml-ds pretrain`): MetaICL's update on copy sequences.

The starting model of a study must already copy what it has seen (induction) for meta-training
to have anything to build on (docs/pretrain.md). The update, its loss contract and its checks
are MetaICL's (`token_mean_update`); only the data differ.
"""

from __future__ import annotations

from typing import Any

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.data.copy_stream import CopyStream, copy_inventory
from maml_ds.data.reader import Example
from maml_ds.training.metaicl import token_mean_update
from maml_ds.training.state import StepStats, TrainContext

__all__ = ["build_copy_stream", "copy_step"]


def global_batch(cfg: RunConfig) -> int:
    ds = cfg.deepspeed
    return ds.micro_batch_size * ds.gradient_accumulation_steps * D.world_size()


def build_copy_stream(
    cfg: RunConfig, tasks: dict[str, list[Example]], tokenizer: Any
) -> CopyStream:
    c = cfg.copy
    return CopyStream(
        copy_inventory(tokenizer),
        seed=cfg.seed,
        min_length=c.copy_min_length,
        max_length=c.copy_max_length,
        max_prefix=c.copy_max_prefix,
        position_offset=c.copy_position_offset,
        offset_from=c.copy_offset_from * global_batch(cfg),
    )


def copy_step(ctx: TrainContext) -> StepStats:
    """One update on the next global batch of copy sequences."""
    return token_mean_update(ctx, ctx.sampler.take(global_batch(ctx.cfg)))
