"""One MetaICL update: GAS micro-batches per rank through the DeepSpeed engine.

Loss contract: the loss of an update is the mean cross-entropy over ALL scored tokens of the
global batch (every rank, every micro-batch). Each rank scales its token-sum by
``world_size * accumulation / global_scored_tokens``; DeepSpeed's rank average and its 1/GAS
scaling then give exactly the global per-token mean, so 2 ranks x micro-batch 1 equals 1 rank
x micro-batch 2 (tests/engine/test_metaicl.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.data.prompts import EncodedPrompt, collate
from maml_ds.data.reader import Example
from maml_ds.data.sampler import MetaICLSampler
from maml_ds.losses import scored_loss_sum
from maml_ds.training.state import (
    StepStats,
    TrainContext,
    encode_prompts,
    fresh_tasks,
    num_loss_tokens,
)
from maml_ds.training.zero_layout import (
    gradients_are_finite,
    restore_optimizer_state,
    set_learning_rate_zero,
    snapshot_optimizer_state,
    zero_gradients,
)

__all__ = ["build_prompt_sampler", "metaicl_step", "scored_token_sum", "token_mean_update"]


def build_prompt_sampler(cfg: RunConfig, tasks: dict[str, list[Example]], tokenizer: Any) -> Any:
    """The prompt stream: the setting's task files, or a fresh synthetic task per prompt."""
    if cfg.data.tasks == "fresh":
        from maml_ds.data.fresh import FreshPromptSampler

        return FreshPromptSampler(fresh_tasks(cfg))
    return MetaICLSampler(tasks, num_demonstrations=cfg.data.num_demonstrations, seed=cfg.seed)


def scored_token_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch of the cross-entropy of every scored token (a scalar)."""
    positions = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **positions
    ).logits
    return scored_loss_sum(logits, batch)[0].sum()


def metaicl_step(ctx: TrainContext) -> StepStats:
    """One optimizer update: GAS micro-batches per rank, a global per-token mean loss."""
    ds = ctx.cfg.deepspeed
    # Every rank draws the whole global batch (deterministic) and encodes only what it needs
    # to count the global scored tokens: a normalisation free of communication.
    prompts = ctx.sampler.take(
        ds.gradient_accumulation_steps * D.world_size() * ds.micro_batch_size
    )
    return token_mean_update(ctx, encode_prompts(ctx, prompts))


def token_mean_update(ctx: TrainContext, encoded: list[EncodedPrompt]) -> StepStats:
    """One optimizer update on a global batch of encoded prompts (every rank holds all of them
    and runs its GAS micro-batches): the loss is the per-token mean over the global batch."""
    ds = ctx.cfg.deepspeed
    world, rank = D.world_size(), D.rank()
    micro, gas = ds.micro_batch_size, ds.gradient_accumulation_steps
    total_scored = sum(num_loss_tokens(p) for p in encoded)
    scale = world * gas / total_scored
    device = D.device()
    loss_sum = 0.0
    for m in range(gas):
        start = (m * world + rank) * micro
        batch = collate(encoded[start : start + micro], ctx.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        ctx.engine.set_gradient_accumulation_boundary(m == gas - 1)
        token_sum = scored_token_sum(ctx.engine, batch)
        ctx.engine.backward(token_sum * scale)
        loss_sum += float(token_sum.detach())
    # Checked before anything reaches the weights: the global loss and every rank's reduced
    # gradients (under fp16 those are loss-scaled: DeepSpeed's overflow check owns them). A
    # skipped update applies zeros at lr 0 (parameters stay bit-exact; the LR schedule
    # advances) and puts the optimizer state back as it was.
    loss = D.all_reduce_sum(loss_sum) / total_scored
    skipped = not math.isfinite(loss)
    if ds.precision != "fp16":
        skipped = not gradients_are_finite(ctx.engine, ds.zero_stage) or skipped
    if skipped:
        snapshot = snapshot_optimizer_state(ctx.engine)
        zero_gradients(ctx.engine, ds.zero_stage)
        set_learning_rate_zero(ctx.engine)
    ctx.engine.step()
    if skipped:
        restore_optimizer_state(ctx.engine, snapshot)
    return StepStats(
        loss=loss,
        num_prompts=len(encoded),
        num_batches=gas * world,
        skipped=skipped,
        overflow=not skipped and not ctx.engine.was_step_applied(),
    )
