"""The sharded MAML path at ZeRO-3 (`hvp-fd`, `first-order`): nothing full-size on any rank.

Every loss of `meta_gradient` there is an ordinary forward/backward of the engine's own module
(DeepSpeed gathers layer by layer) at a point written into this rank's shards, its gradient read
back as this rank's partition; the task mean is set as the partition gradient of
`engine.step()`. The gather path (`maml.make_loss_fn`) stays the reference. docs/memory.md,
"The sharded path (ZeRO-3)"; the internals it needs are the last section of `zero_layout.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.losses import scored_loss_sum
from maml_ds.training.state import rounding_generator
from maml_ds.training.zero_layout import (
    PartitionLayout,
    clear_zero3_grads,
    read_zero3_grads,
    set_learning_rate_zero,
    write_zero3_grads,
    write_zero3_point,
)

__all__ = ["ShardedPasses", "uses_sharded_path"]

SHARDED_MODES = ("hvp-fd", "first-order")
"""Modes whose every quantity is an ordinary gradient at some parameter point."""


def uses_sharded_path(cfg: RunConfig) -> bool:
    """The engine's default for a run: ZeRO-3, hvp-fd or first order, fp32 or bf16 (fp16 loss
    scaling of the passes is not handled: fp16 keeps the gather path)."""
    mode = "first-order" if cfg.method_spec.first_order else cfg.meta.second_order
    ds = cfg.deepspeed
    return ds.zero_stage == 3 and mode in SHARDED_MODES and ds.precision != "fp16"


class _PassAtPoint(torch.autograd.Function):
    """loss(point) whose backward returns the gradient the engine's pass already computed.

    The forward runs one engine forward/backward at `point` (this rank's partitions); autograd
    then sees an ordinary scalar function of the partitions, so `meta_gradient` is unchanged.
    """

    @staticmethod
    def forward(ctx, passes: ShardedPasses, batch: Mapping[str, Any], *partitions: Tensor):
        loss, grads = passes.loss_and_grad(dict(zip(passes.keys, partitions, strict=True)), batch)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads, ctx.grads = ctx.grads, None
        return (None, None, *(g.mul_(grad_out) for g in grads))


class ShardedPasses:
    """The loss function and the final update of the sharded path, for one engine."""

    def __init__(self, engine, layout: PartitionLayout, *, stochastic_rounding: bool = False):
        if layout.stage != 3:
            raise ValueError(f"the sharded path needs ZeRO-3, not ZeRO-{layout.stage}")
        self.engine, self.layout = engine, layout
        self.keys = list(layout.keys)
        self.world = D.world_size()
        self.stochastic_rounding = stochastic_rounding

    def loss_and_grad(
        self, point: Mapping[str, Tensor], batch: Mapping[str, Any]
    ) -> tuple[Tensor, list[Tensor]]:
        """This rank's share of the batch's per-token mean at `point`, and this rank's partition
        of the gradient of the global objective (the sum of the shares over ranks). With
        stochastic rounding the draws come from the batch's `rounding_seed`."""
        rounding = rounding_generator(batch) if self.stochastic_rounding else None
        write_zero3_point(self.layout, point, rounding)
        with torch.enable_grad():
            logits = self.engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss = scored_loss_sum(logits, batch)[0].sum() / batch["num_tokens"]
            del logits
            self.engine.backward(loss)
        grads = read_zero3_grads(self.layout)
        clear_zero3_grads(self.engine)
        if self.world > 1:  # DeepSpeed averages over ranks; the objective is their sum
            for g in grads.values():
                g.mul_(self.world)
        return loss.detach(), [grads[key] for key in self.keys]

    def loss_fn(self, local: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """`meta_gradient`'s loss_fn: differentiable in `local` (first order only)."""
        return _PassAtPoint.apply(self, batch, *(local[key] for key in self.keys))

    def restore(self) -> None:
        """The shards back at theta_0 (this rank's fp32 master), as before the first pass."""
        write_zero3_point(self.layout, self.layout.local_params())

    def update(self, mean: Mapping[str, Tensor], *, skip: bool) -> None:
        """Apply the task-mean meta-gradient partition through `engine.step()`; a skipped update
        (the caller checked `mean`, the losses and the moments) applies zeros at lr 0, so the
        parameters stay bit-exact (the caller restores the moments)."""
        self.restore()
        if skip:
            mean = {key: torch.zeros_like(g) for key, g in mean.items()}
            set_learning_rate_zero(self.engine)
        write_zero3_grads(self.layout, mean)
        self.engine.step()
