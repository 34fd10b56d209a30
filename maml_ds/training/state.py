"""What one training run holds (context, counters, per-update stats) and how its prompts become
batches.

Loss contract shared by every step: a batch's loss is the mean cross-entropy over the scored
tokens of the GLOBAL batch (all ranks), so each rank needs the global scored-token count
(`num_loss_tokens` summed over the whole batch, which every rank draws) beside its own slice
(docs/engine.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.data.prompts import PromptFormat, build_training_prompt, collate
from maml_ds.data.sampler import PromptSpec

__all__ = [
    "StepStats",
    "TrainContext",
    "TrainState",
    "encode_prompts",
    "fresh_tasks",
    "local_task_batch",
    "num_loss_tokens",
]


@dataclass
class TrainState:
    """Counters saved in every checkpoint."""

    step: int = 0
    """Optimizer updates done (MetaICL steps or meta-updates)."""
    num_batches: int = 0
    """Batches processed (MetaICL: micro-batches x ranks; MAML: 2kn per meta-update)."""
    num_prompts: int = 0
    num_skipped: int = 0
    """Updates skipped for a non-finite loss, (meta-)gradient or inner moments (ours)."""
    num_overflow: int = 0
    """Updates DeepSpeed itself skipped (fp16 loss-scale overflow; normal early in a run)."""
    consecutive_skips: int = 0
    """Updates not applied in a row up to `step` (skipped or overflow; 0: the last one applied)."""
    best_step: int = 0
    """--validate-every: the update with the best validation score so far (0: the start)."""
    best_score: float | None = None
    """Its validation score (RUN/best holds its weights)."""


@dataclass
class StepStats:
    loss: float
    num_prompts: int
    num_batches: int
    """Batches processed across ranks in this update."""
    skipped: bool = False
    """The update was skipped before anything was written (non-finite loss or gradient)."""
    overflow: bool = False
    """DeepSpeed skipped the step (fp16 loss-scale overflow: it lowers the scale and retries)."""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainContext:
    cfg: RunConfig
    engine: Any
    tokenizer: Any
    prompt_format: PromptFormat
    sampler: Any
    state: TrainState
    out_dir: Path
    validation: Any = None
    """The validation tasks (training/validation.ValidationSet) with --validate-every."""


def fresh_tasks(cfg: RunConfig) -> Any:
    """The run's stream of fresh synthetic tasks (`--tasks fresh`, maml_ds/data/fresh.py)."""
    from maml_ds.data.fresh import FreshTasks

    return FreshTasks.from_suite(
        cfg.data.data_dir,
        setting=cfg.data.setting,
        seed=cfg.seed,
        k=cfg.data.num_demonstrations,
        copy_share=cfg.data.copy_share,
    )


def encode_prompts(ctx: TrainContext, prompts: list[PromptSpec]) -> list:
    score_demonstrations = ctx.cfg.data.score_demonstrations
    return [
        build_training_prompt(
            ctx.tokenizer,
            p.demonstrations,
            p.target,
            ctx.prompt_format,
            score_demonstrations=score_demonstrations,
        )
        for p in prompts
    ]


def num_loss_tokens(prompt) -> int:
    """Scored tokens that the loss counts (position 0 has nothing before it)."""
    return sum(prompt.scored_mask[1:])


def rounding_seed(seed: int, step: int, task: int, batch: int) -> int:
    """The seed of one MAML batch's stochastic-rounding draws (`meta.adapted_rounding`): a
    function of the run's seed, the update, the task, the batch's index in it and the rank, so
    a resumed run draws what an uninterrupted one does."""
    text = f"{seed}/{step}/{task}/{batch}/{D.rank()}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def rounding_generator(batch: Mapping[str, Any]) -> torch.Generator:
    """A generator on this rank's device seeded with the batch's `rounding_seed`: every pass on
    one batch (forward, replays, finite differences) draws the same numbers."""
    return torch.Generator(D.device()).manual_seed(batch["rounding_seed"])


def local_task_batch(ctx: TrainContext, prompts: list[PromptSpec]) -> dict[str, Any]:
    """This rank's slice of a global task batch, with the global scored-token count."""
    encoded = encode_prompts(ctx, prompts)
    micro = ctx.cfg.deepspeed.micro_batch_size
    mine = encoded[D.rank() * micro : (D.rank() + 1) * micro]
    batch = collate(mine, ctx.tokenizer.pad_token_id)
    batch = {k: v.to(D.device()) for k, v in batch.items()}
    batch["num_tokens"] = sum(num_loss_tokens(p) for p in encoded)
    return batch
