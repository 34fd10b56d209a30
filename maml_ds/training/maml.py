"""MAML-en-LLM through a DeepSpeed engine (ZeRO 0, 1, 2 and 3): one meta-update per call.

The math is `maml_ds.meta.meta_gradient`, unchanged; this module says how ranks cooperate. All
ranks work on one task at a time (its batches split across ranks); each runs the inner steps on
its own ZeRO partition (`zero_layout.PartitionLayout`), and `loss_fn` gathers the full
parameters with a differentiable all-reduce, so every mode computes on every rank its partition
of the meta-gradient a single process would. The task mean reaches DeepSpeed through
`engine.backward` once per meta-update. The full story: docs/engine.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from rich.console import Console
from torch import Tensor
from torch.func import functional_call

from maml_ds import distributed as D
from maml_ds.config import RunConfig, kept_support_gradients
from maml_ds.data.reader import Example
from maml_ds.data.sampler import PromptSpec, TaskSampler
from maml_ds.losses import scored_loss_sum
from maml_ds.meta.gradient import LossFn, meta_gradient
from maml_ds.meta.live_bytes import host_copy
from maml_ds.meta.precision import UpdateRounding, inner_update_kept, stochastic_round_ste
from maml_ds.training.sharded import ShardedPasses, uses_sharded_path
from maml_ds.training.state import (
    StepStats,
    TrainContext,
    fresh_tasks,
    local_task_batch,
    rounding_generator,
    rounding_seed,
)
from maml_ds.training.zero_layout import PartitionLayout, set_learning_rate_zero

__all__ = ["MamlStep", "build_task_sampler", "make_loss_fn"]

INNER_ROUNDING_EVERY = 50
"""At 16 bits, measure how much of an inner step reaches the forward on the first meta-update
and every this many after (`StepStats.extra["inner_kept"]`, `["inner_cosine"]`)."""
INNER_KEPT_WARNING = 0.5
"""Warn (once per run) when fewer of the elements an inner step changes survive the rounding."""


def build_task_sampler(cfg: RunConfig, tasks: dict[str, list[Example]], tokenizer: Any) -> Any:
    """MAML's task stream: tasks of the setting's files, or one fresh synthetic task each."""
    if cfg.data.tasks == "fresh":
        from maml_ds.data.fresh import FreshTaskSampler

        return FreshTaskSampler(fresh_tasks(cfg))
    return TaskSampler(tasks, num_demonstrations=cfg.data.num_demonstrations, seed=cfg.seed)


def make_loss_fn(layout: PartitionLayout, rounding_dtype: torch.dtype | None = None):
    """loss_fn(local partition, batch) -> this rank's share of the batch's per-token mean.

    `rounding_dtype`: the partition is rounded stochastically into it (straight-through, the
    draws from the batch's `rounding_seed`) before the gather; None: nearest, in the gather."""

    def loss_fn(local: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        if rounding_dtype is not None:
            generator = rounding_generator(batch)
            local = {
                key: stochastic_round_ste(local[key], rounding_dtype, generator)
                for key in layout.keys
            }
        full = layout.gather(local)
        logits = functional_call(
            layout.forward_module,
            full,
            args=(),
            kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        ).logits
        return scored_loss_sum(logits, batch)[0].sum() / batch["num_tokens"]

    return loss_fn


def _all_reduced(rounding: UpdateRounding) -> UpdateRounding:
    sums = rounding.as_tensor().to(D.device())
    if D.world_size() > 1:
        dist.all_reduce(sums)
    return UpdateRounding.from_sums(sums)


def _watch_first_inner_step(
    loss_fn: LossFn, theta0: Mapping[str, Tensor], dtype: torch.dtype, out: list[UpdateRounding]
) -> LossFn:
    """loss_fn that compares its second point (theta_1: the first inner step, whatever k and the
    mode) with theta_0 as the `dtype` forward sees them, appending the result to `out`."""
    calls = 0

    def watched(local: dict[str, Tensor], batch: Any) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            out.append(inner_update_kept(theta0, local, dtype))
        return loss_fn(local, batch)

    return watched


def _keep_in_host_memory(grads: dict[str, Tensor]) -> Callable[[], dict[str, Tensor]]:
    """`meta_gradient`'s keep_fn on the sharded path: a kept support gradient waits in host
    memory (pinned) and comes back to the device for each use."""
    saved = {key: host_copy(g) for key, g in grads.items()}
    device = D.device()
    return lambda: {key: g.to(device, non_blocking=True, copy=True) for key, g in saved.items()}


def _moments_are_finite(state: Mapping[str, Any] | None) -> bool:
    """The inner AdamW moments of this rank's partition are finite (None: an SGD inner loop)."""
    if state is None:
        return True
    return all(
        bool(torch.isfinite(m["exp_avg"]).all() and torch.isfinite(m["exp_avg_sq"]).all())
        for m in state.values()
    )


class MamlStep:
    """One meta-update of MAML-2k-n per call (n tasks, each k inner steps + k query batches).

    Owns the engine's `PartitionLayout`, built once from the context's engine.
    """

    def __init__(self, ctx: TrainContext, *, sharded: bool | None = None):
        self.layout = PartitionLayout(ctx.engine, ctx.cfg.deepspeed.zero_stage)
        if sharded is None:  # ZeRO-3 hvp-fd / first-order: the sharded path (sharded.py)
            sharded = uses_sharded_path(ctx.cfg)
        dtypes = set(self.layout.dtype_by_name.values())
        self.model_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
        self.sixteen_bit = self.model_dtype in (torch.bfloat16, torch.float16)
        rounding = ctx.cfg.meta.adapted_rounding
        self.stochastic_rounding = self.sixteen_bit and rounding == "stochastic"
        self.sharded = None
        if sharded:
            self.sharded = ShardedPasses(
                ctx.engine, self.layout, stochastic_rounding=self.stochastic_rounding
            )
        self.warned_inner_kept = False
        self.num_calls = 0

    def local_batch(self, ctx: TrainContext, prompts: list[PromptSpec]) -> dict[str, Any]:
        """This rank's slice of one global task batch (a check may feed other batches here)."""
        return local_task_batch(ctx, prompts)

    def __call__(self, ctx: TrainContext) -> StepStats:
        cfg, engine, layout = ctx.cfg, ctx.engine, self.layout
        spec = cfg.method_spec
        k, n = spec.num_inner_steps, spec.num_tasks
        mode = "first-order" if spec.first_order else cfg.meta.second_order
        if self.sharded is not None:
            loss_fn = self.sharded.loss_fn
        else:
            loss_fn = make_loss_fn(layout, self.model_dtype if self.stochastic_rounding else None)
        global_batch = cfg.deepspeed.micro_batch_size * D.world_size()
        # The sharded path keeps the snapshot and the kept support gradients in host memory and
        # steps the live moments in place (nothing to write back): docs/memory.md, "The sharded
        # path".
        in_place = self.sharded is not None and cfg.meta.inner_optimizer == "adamw"
        snapshot = layout.snapshot_moments(host=self.sharded is not None)
        params = {name: p for name, p in layout.param_by_name.items() if p.requires_grad}
        support_loss = query_loss = 0.0
        moments_finite = True  # this rank's inner moments after every task
        accumulated: dict[str, Tensor] | None = None  # sum over tasks, this rank's partition
        rounding: list[UpdateRounding] = []
        measure_rounding = self.sixteen_bit and (
            self.num_calls == 0 or ctx.state.step % INNER_ROUNDING_EVERY == 0
        )
        self.num_calls += 1
        for task in range(n):
            batches = ctx.sampler.take(num_batches=2 * k, batch_size=global_batch)
            local = [self.local_batch(ctx, b) for b in batches]
            for j, batch in enumerate(local):
                batch["rounding_seed"] = rounding_seed(cfg.seed, ctx.state.step, task, j)
            theta0 = layout.local_params()
            task_loss_fn = loss_fn
            if measure_rounding and task == 0 and k > 0:
                task_loss_fn = _watch_first_inner_step(loss_fn, theta0, self.model_dtype, rounding)
            result = meta_gradient(
                task_loss_fn,
                theta0,
                local[:k],
                local[k:],
                inner_lr=cfg.meta.inner_lr,
                inner_optimizer=cfg.meta.inner_optimizer,
                second_order=mode,
                adam_state=layout.inner_moments(),
                betas=cfg.optim.betas,
                eps=cfg.optim.eps,
                weight_decay=cfg.optim.weight_decay,
                fd_mode=cfg.meta.fd_mode,
                fd_scale=cfg.meta.fd_scale,
                norm_fn=layout.global_norm,
                keep_support_gradients=kept_support_gradients(cfg.meta.keep_support_gradients, k),
                keep_fn=_keep_in_host_memory if self.sharded is not None else None,
                moments_in_place=in_place,
            )
            del theta0, task_loss_fn
            moments_finite = moments_finite and _moments_are_finite(result.adam_state)
            if not in_place:
                layout.store_moments(result.adam_state)
            support_loss += D.all_reduce_sum(result.support_loss) / n
            query_loss += D.all_reduce_sum(result.query_loss) / n
            if accumulated is None:
                accumulated = result.grads
            else:  # (no loop variable here: it would keep a partition alive into the next task)
                torch._foreach_add_(list(accumulated.values()), list(result.grads.values()))
            del result
        assert accumulated is not None
        mean = {key: g / n for key, g in accumulated.items()}
        del accumulated
        # Checked before anything reaches the weights: the losses, every rank's partition of the
        # meta-gradient and of the inner moments. A skipped update puts the moments back first
        # (AdamW at lr 0 would still write 0 x NaN into the parameters), applies zeros at lr 0
        # (parameters stay bit-exact; the LR schedule advances) and restores the moments again.
        local_finite = moments_finite and all(bool(torch.isfinite(g).all()) for g in mean.values())
        skipped = D.all_reduce_sum(0.0 if local_finite else 1.0) > 0 or not (
            math.isfinite(support_loss) and math.isfinite(query_loss)
        )
        if skipped:
            layout.restore_moments(snapshot)
        if self.sharded is not None:  # nothing full-size: the mean partition is the gradient
            self.sharded.update(mean, skip=skipped)
            del mean
        else:
            grads = layout.gather(mean, differentiable=False)
            del mean
            if skipped:
                grads = {name: torch.zeros_like(g) for name, g in grads.items()}
                set_learning_rate_zero(engine)
            # ZeRO-3: the surrogate and its backward must see full parameters (docs/engine.md).
            with deepspeed.zero.GatheredParameters(
                list(params.values()), enabled=layout.stage == 3
            ):
                surrogate = sum((p * grads[name]).sum() for name, p in params.items())
                engine.backward(surrogate)
            del grads, surrogate
            engine.step()
        if skipped:
            layout.restore_moments(snapshot)
        del snapshot
        extra = {"support_loss": support_loss, "query_loss": query_loss}
        if rounding:
            extra.update(self._inner_rounding(cfg, _all_reduced(rounding[0])))
        return StepStats(
            loss=query_loss,
            num_prompts=2 * k * n * global_batch,
            num_batches=2 * k * n,
            skipped=skipped,
            overflow=not skipped and not engine.was_step_applied(),
            extra=extra,
        )

    def _inner_rounding(self, cfg: RunConfig, rounding: UpdateRounding) -> dict[str, float]:
        """The first inner step's survival in a nearest-rounded 16-bit forward; one warning per
        run (rank 0) when most of it is lost, unless the run rounds stochastically (then the
        forward sees the step in expectation)."""
        kept = rounding.share_kept
        lost = kept < INNER_KEPT_WARNING and not self.stochastic_rounding
        if lost and not self.warned_inner_kept and D.is_main():
            Console(stderr=True).print(
                f"[bold yellow]warning:[/] only {kept:.0%} of the elements an inner step changes "
                f"reach the {cfg.deepspeed.precision} forward (cosine(realised, intended) "
                f"{rounding.cosine:.2f}, inner lr {cfg.meta.inner_lr:g}): most of the "
                "adaptation is lost to 16-bit rounding. Use --adapted-rounding stochastic, a "
                'larger --inner-lr or --precision fp32 (docs/memory.md, "Precision of the '
                'adaptation").'
            )
        self.warned_inner_kept = self.warned_inner_kept or lost
        return {"inner_kept": kept, "inner_cosine": rounding.cosine}
