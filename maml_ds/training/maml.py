"""MAML-en-LLM through a DeepSpeed engine (ZeRO 0, 1, 2): one meta-update per call.

The math is `maml_ds.meta.meta_gradient`, unchanged; this module only says where its tensors
live and how ranks cooperate:

* **Partition-local parameters.** Each rank runs the inner steps on the part of the parameters
  that ZeRO gives it: at ZeRO-1/2 the optimizer's flat fp32 partition of each param group (the
  tensors `SharedMomentAdamW` keeps the shared moments for, so the inner AdamW steps read and
  update exactly that partition of the moments); at ZeRO-0, where nothing is partitioned, the
  same contiguous 1/W chunks of the flattened parameters, with their slice of the moments.
* **One global objective.** ``loss_fn(local, batch)`` gathers the full parameters from every
  rank's partition with a *differentiable* all-reduce of zero-padded partitions and returns this
  rank's share of the batch loss (its token-sum / the global scored-token count of the batch).
  The sum over ranks is the per-token mean of the global batch, and autograd through the
  collective gives each rank the gradient of that global objective with respect to its own
  partition, to every order. So every mode (exact, hvp, hvp-fd, first-order) computes, on every
  rank, its partition of the exact same meta-gradient that a single process would, with
  task-synchronous data parallelism (all ranks on one task, its batches split across ranks).
  Norms for the finite-difference step are all-reduced (`norm_fn`).
* **Through DeepSpeed's own backward.** Tasks run one after another (memory flat in n); their
  meta-gradients are summed in this rank's partition. The task mean, gathered (all ranks hold
  the same), is fed once per meta-update by ``engine.backward(sum(p * g_p))`` and
  ``engine.step()``: rank averaging, ZeRO partitioning, clipping and loss scaling apply.

ZeRO-3: the partition is each parameter's shard (the optimizer's fp32 sub-group flats). Its
module hooks re-partition parameters inside autograd and `functional_call` on the engine's module
fails (deepspeed-notes.md), so the forward passes run `functional_call` on a *shadow* module: the
same architecture built on the meta device, holding no tensors, fed the gathered parameters.
`exact` and `hvp` are refused at ZeRO-3 by the config (a start-up error naming `hvp-fd`): their
double-backward graphs hold full parameters per step, against the point of ZeRO-3.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.data.prompts import collate
from maml_ds.data.sampler import TaskSampler
from maml_ds.losses import scored_loss_sum
from maml_ds.meta.gradient import meta_gradient
from maml_ds.meta.optim import AdamWMoments, SharedMomentAdamW


def build_task_sampler(cfg: RunConfig, tasks) -> TaskSampler:
    return TaskSampler(tasks, num_demonstrations=cfg.data.num_demonstrations, seed=cfg.seed)


def client_optimizer(engine) -> SharedMomentAdamW:
    opt = engine.optimizer
    while not isinstance(opt, SharedMomentAdamW):
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise TypeError("the engine's optimizer is not a SharedMomentAdamW")
    return opt


# --------------------------------------------------------------------------------------------
# Where this rank's partition lives
# --------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """One flat group: its parameters at offsets of a flat vector, cut into W partitions."""

    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]
    flat_numel: int
    starts: list[int]  # partition start of each rank
    sizes: list[int]  # partition size of each rank
    shard_numels: list[int] | None = None
    """ZeRO-3: each parameter's shard size; the partition is the concatenation of this rank's
    shards, and the full flat vector holds parameter j as its W shards side by side (padded)."""


class _CompactGradient(torch.autograd.Function):
    """Identity whose backward copies the incoming gradient into its own storage.

    The gradient of a partition arrives as a slice of the full-size flat gradient of
    `gather`; without the copy, every partition-sized gradient kept by the meta-gradient
    (support gradients, the adjoint) would keep a full parameter-size buffer alive.
    Differentiable to any order (the copy is an ordinary op).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clone()


def _differentiable_sum_over_ranks(t: Tensor) -> Tensor:
    """Sum over ranks whose backward is again a sum over ranks (to any order)."""
    if D.world_size() == 1:
        return t
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        # Deprecated in favour of functional collectives, which have no all_reduce autograd.
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def _param_dtype(p: Tensor) -> torch.dtype:
    return p.ds_tensor.dtype if hasattr(p, "ds_tensor") else p.dtype


def _shadow(module: torch.nn.Module) -> torch.nn.Module:
    """The module's architecture on the meta device, without ZeRO-3 hooks or tensors: every
    forward gets all of its parameters from `functional_call`."""
    if hasattr(module, "config") and hasattr(type(module), "_from_config"):
        with torch.device("meta"):
            shadow = type(module)._from_config(module.config)
    else:
        raise TypeError(f"cannot build a shadow of {type(module).__name__} for ZeRO-3")
    if list(shadow.buffers()):
        raise TypeError(f"{type(module).__name__} has buffers; ZeRO-3 MAML needs none")
    return shadow.train(module.training)


def _split_params(flat: Tensor, group: _Group, world: int) -> list[Tensor]:
    """The parameters of a group (in `group.names` order, shaped) from its full flat vector."""
    shapes = group.shapes
    if group.shard_numels is not None:  # ZeRO-3: parameter-major blocks of W shards each
        blocks = flat.split([world * numel for numel in group.shard_numels])
        return [b[: math.prod(shape)].view(shape) for b, shape in zip(blocks, shapes, strict=True)]
    sizes, keep, pos = [], [], 0  # alignment gaps between parameters are split off too
    for shape, offset in zip(shapes, group.offsets, strict=True):
        if offset > pos:
            sizes.append(offset - pos)
            keep.append(False)
        sizes.append(math.prod(shape))
        keep.append(True)
        pos = offset + math.prod(shape)
    if pos < flat.numel():
        sizes.append(flat.numel() - pos)
        keep.append(False)
    pieces = [p for p, k in zip(flat.split(sizes), keep, strict=True) if k]
    return [p.view(shape) for p, shape in zip(pieces, shapes, strict=True)]


class PartitionLayout:
    """This rank's partition of the parameters and of the shared moments (ZeRO 0, 1, 2)."""

    def __init__(self, engine, stage: int):
        self.engine = engine
        self.stage = stage
        self.module = engine.module
        self.rank, self.world = D.rank(), D.world_size()
        self.opt = client_optimizer(engine)
        names = {id(p): n for n, p in self.module.named_parameters()}
        self.param_by_name = dict(self.module.named_parameters())
        self.dtype_by_name = {n: _param_dtype(p) for n, p in self.param_by_name.items()}
        self.forward_module = self.module
        self.groups: list[_Group] = []
        if stage == 0:
            params = [p for p in self.module.parameters() if p.requires_grad]
            offsets, total = [], 0
            for p in params:
                offsets.append(total)
                total += p.numel()
            size = -(-total // self.world)
            self.groups.append(
                _Group([names[id(p)] for p in params], [p.shape for p in params], offsets,
                       size * self.world, [r * size for r in range(self.world)],
                       [size] * self.world)
            )  # fmt: skip
            self.keys = ["flat0"]
        elif stage == 3:
            zopt = engine.optimizer
            for sub_group in zopt.fp16_groups:
                shard = [int(p.partition_numel()) for p in sub_group]
                offsets = [sum(shard[:j]) for j in range(len(shard))]
                size = sum(shard)
                self.groups.append(
                    _Group([names[id(p)] for p in sub_group], [p.ds_shape for p in sub_group],
                           offsets, size * self.world, [r * size for r in range(self.world)],
                           [size] * self.world, shard_numels=shard)
                )  # fmt: skip
            self.keys = [f"group{i}" for i in range(len(self.groups))]
            self._partitions = list(zopt.fp32_partitioned_groups_flat)
            self.forward_module = _shadow(self.module)
        else:
            zopt = engine.optimizer
            for i, group in enumerate(zopt.round_robin_bit16_groups):
                parts = zopt.parallel_partitioned_bit16_groups[i]
                sizes = [int(t.numel()) for t in parts]
                starts = [sum(sizes[:r]) for r in range(len(sizes))]
                self.groups.append(
                    _Group([names[id(p)] for p in group], [p.shape for p in group],
                           [int(o) for o in zopt.round_robin_bit16_offsets[i]],
                           int(zopt.bit16_groups_flat[i].numel()), starts, sizes)
                )  # fmt: skip
            self.keys = [f"group{i}" for i in range(len(self.groups))]
            self._partitions = list(zopt.single_partition_of_fp32_groups)

    # ---------------------------------------------------------------- parameters
    def local_params(self) -> dict[str, Tensor]:
        """theta_0 of this rank's partition (fp32 master at ZeRO-1/2; a copy at ZeRO-0)."""
        if self.stage == 0:
            return {"flat0": self._local_slice(self.groups[0], self.param_by_name).detach()}
        return {key: part.detach() for key, part in zip(self.keys, self._partitions, strict=True)}

    def _local_slice(self, group: _Group, tensors: Mapping[str, Tensor]) -> Tensor:
        start, size = group.starts[self.rank], group.sizes[self.rank]
        pieces, pos = [], start
        end = start + size
        for name, offset in zip(group.names, group.offsets, strict=True):
            t = tensors[name].reshape(-1)
            lo, hi = max(start, offset), min(end, offset + t.numel())
            if lo >= hi:
                continue
            if lo > pos:  # alignment padding between parameters
                pieces.append(t.new_zeros(lo - pos))
            pieces.append(t[lo - offset : hi - offset])
            pos = hi
        if pos < end:
            ref = next(iter(tensors.values()))
            pieces.append(ref.new_zeros(end - pos).reshape(-1))
        return torch.cat(pieces).to(torch.float32) if pieces else torch.zeros(size)

    def gather(
        self, local: Mapping[str, Tensor], *, differentiable: bool = True
    ) -> dict[str, Tensor]:
        """Full parameters (by module name) from every rank's partition."""
        out: dict[str, Tensor] = {}
        for key, group in zip(self.keys, self.groups, strict=True):
            part = _CompactGradient.apply(local[key]) if differentiable else local[key]
            flat = torch.cat(self._padded_pieces(part, group))
            if differentiable:
                flat = _differentiable_sum_over_ranks(flat)
            elif self.world > 1:
                flat = flat.detach().clone()
                dist.all_reduce(flat)
            # One split per group, not one slice per parameter: the backward of a split is one
            # full-size gradient, while each slice's backward would zero-fill its own.
            for name, piece in zip(
                group.names, _split_params(flat, group, self.world), strict=True
            ):
                out[name] = piece.to(self.dtype_by_name[name])
        return out

    def _padded_pieces(self, part: Tensor, group: _Group) -> list[Tensor]:
        """This rank's partition placed in a zero full-size flat vector (as pieces to cat).

        ZeRO 0-2: the partition is one contiguous range. ZeRO-3: the partition is this rank's
        shard of every parameter; they are placed parameter-major (parameter j's W shards side
        by side), so that each parameter is a contiguous prefix of its block.
        """
        if group.shard_numels is None:
            start, size = group.starts[self.rank], group.sizes[self.rank]
            return [part.new_zeros(start), part, part.new_zeros(group.flat_numel - start - size)]
        pieces = []
        for shard, numel in zip(part.split(group.shard_numels), group.shard_numels, strict=True):
            before, after = self.rank * numel, (self.world - 1 - self.rank) * numel
            pieces += [part.new_zeros(before), shard, part.new_zeros(after)]
        return pieces

    def global_norm(self, tensors: Mapping[str, Tensor]) -> float:
        """L2 norm over all ranks' partitions (float32 per tensor, summed in float64)."""
        sq = sum(float(torch.linalg.vector_norm(t.detach())) ** 2 for t in tensors.values())
        return math.sqrt(D.all_reduce_sum(sq))

    # ---------------------------------------------------------------- shared moments
    def inner_moments(self) -> dict[str, AdamWMoments] | None:
        """The inner AdamW moments of this rank's partition (copies at ZeRO-0)."""
        if self.opt.inner_optimizer == "sgd":
            return None
        if self.stage != 0:
            return self.opt.inner_state(dict(zip(self.keys, self._partitions, strict=True)))
        live = self.opt.inner_state({n: self.param_by_name[n] for n in self.groups[0].names})
        assert live is not None
        steps = {float(s["step"]) for s in live.values()}
        if len(steps) != 1:
            raise RuntimeError(f"per-tensor step counts differ ({sorted(steps)}); cannot flatten")
        group = self.groups[0]
        return {
            "flat0": AdamWMoments(
                step=next(iter(live.values()))["step"].clone(),
                exp_avg=self._local_slice(group, {n: s["exp_avg"] for n, s in live.items()}),
                exp_avg_sq=self._local_slice(group, {n: s["exp_avg_sq"] for n, s in live.items()}),
            )
        }

    @torch.no_grad()
    def store_moments(self, state: Mapping[str, AdamWMoments] | None) -> None:
        """Write the moments after the inner steps back into the optimizer's state."""
        if state is None:
            return
        if self.stage != 0:
            self.opt.load_inner_state(dict(zip(self.keys, self._partitions, strict=True)), state)
            return
        live = self.opt.inner_state({n: self.param_by_name[n] for n in self.groups[0].names})
        assert live is not None
        m = self.gather({"flat0": state["flat0"]["exp_avg"]}, differentiable=False)
        v = self.gather({"flat0": state["flat0"]["exp_avg_sq"]}, differentiable=False)
        for name, s in live.items():
            s["exp_avg"].copy_(m[name])
            s["exp_avg_sq"].copy_(v[name])
            s["step"].copy_(state["flat0"]["step"])

    def full_state(self, key: str) -> dict[str, Tensor]:
        """The optimizer state ``key`` (e.g. exp_avg) of every parameter, gathered (by name)."""
        if self.stage == 0:
            return {n: self.opt.state[self.param_by_name[n]][key] for n in self.groups[0].names}
        local = {
            k: self.opt.state[t][key] for k, t in zip(self.keys, self._partitions, strict=True)
        }
        return self.gather(local, differentiable=False)

    def _state_owners(self) -> list[Tensor]:
        """The tensors this rank's optimizer state is keyed by."""
        if self.stage == 0:
            return [self.param_by_name[n] for n in self.groups[0].names]
        return list(self._partitions)

    def snapshot_moments(self) -> list[dict[str, Any]]:
        """A copy of this rank's whole optimizer state (to restore when an update is skipped)."""
        return [
            {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.opt.state[t].items()}
            for t in self._state_owners()
        ]

    @torch.no_grad()
    def restore_moments(self, snapshot: Sequence[Mapping[str, Any]]) -> None:
        """Put the state back exactly: same keys (state created since is dropped), same values."""
        for owner, saved in zip(self._state_owners(), snapshot, strict=True):
            state = self.opt.state[owner]
            for key in [k for k in state if k not in saved]:
                del state[key]
            for key, value in saved.items():
                if isinstance(value, Tensor) and isinstance(state.get(key), Tensor):
                    state[key].copy_(value)
                else:
                    state[key] = value


# --------------------------------------------------------------------------------------------
# One meta-update
# --------------------------------------------------------------------------------------------


def _local_batch(ctx, prompts) -> dict[str, Any]:
    """This rank's slice of a global task batch, with the global scored-token count."""
    from maml_ds.training.loop import encode_prompts, num_loss_tokens

    encoded = encode_prompts(ctx, prompts)
    micro = ctx.cfg.deepspeed.micro_batch_size
    mine = encoded[D.rank() * micro : (D.rank() + 1) * micro]
    batch = collate(mine, ctx.tokenizer.pad_token_id)
    batch = {k: v.to(D.device()) for k, v in batch.items()}
    batch["num_tokens"] = sum(num_loss_tokens(p) for p in encoded)
    return batch


def make_loss_fn(layout: PartitionLayout):
    """loss_fn(local partition, batch) -> this rank's share of the batch's per-token mean."""

    def loss_fn(local: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        full = layout.gather(local)
        logits = functional_call(
            layout.forward_module,
            full,
            args=(),
            kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        ).logits
        return scored_loss_sum(logits, batch)[0].sum() / batch["num_tokens"]

    return loss_fn


def maml_step(ctx) -> Any:
    """One meta-update of MAML-2k-n: n tasks, each k inner steps + k query batches."""
    from maml_ds.training.loop import StepStats

    cfg, engine = ctx.cfg, ctx.engine
    spec = cfg.method_spec
    k, n = spec.num_inner_steps, spec.num_tasks
    mode = "first-order" if spec.first_order else cfg.meta.second_order
    if ctx.layout is None:
        ctx.layout = PartitionLayout(engine, cfg.deepspeed.zero_stage)
    layout = ctx.layout
    loss_fn = make_loss_fn(layout)
    global_batch = cfg.deepspeed.micro_batch_size * D.world_size()
    snapshot = layout.snapshot_moments()
    params = {name: p for name, p in layout.param_by_name.items() if p.requires_grad}
    support_loss = query_loss = 0.0
    accumulated: dict[str, Tensor] | None = None  # sum over tasks, this rank's partition
    for _ in range(n):
        batches = ctx.sampler.take(num_batches=2 * k, batch_size=global_batch)
        local = [_local_batch(ctx, b) for b in batches]
        result = meta_gradient(
            loss_fn,
            layout.local_params(),
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
            fd_rel_scale=cfg.meta.fd_scale,
            norm_fn=layout.global_norm,
        )
        layout.store_moments(result.adam_state)
        support_loss += D.all_reduce_sum(result.support_loss) / n
        query_loss += D.all_reduce_sum(result.query_loss) / n
        if accumulated is None:
            accumulated = result.grads
        else:  # (no loop variable here: it would keep a partition alive into the next task)
            torch._foreach_add_(list(accumulated.values()), list(result.grads.values()))
        del result
    assert accumulated is not None
    grads = layout.gather({key: g / n for key, g in accumulated.items()}, differentiable=False)
    del accumulated
    # All ranks hold the same gathered meta-gradient, so this decision is the same everywhere.
    skipped = not all(bool(torch.isfinite(g).all()) for g in grads.values())
    if skipped:
        # Feed zeros at lr 0: parameters stay bit-exact (p * (1 - 0*wd) - 0 * ...), and the
        # moments are put back below as they were before this update. The LR schedule
        # advances (the scheduler resets lr from its lambda right after the step).
        grads = {name: torch.zeros_like(g) for name, g in grads.items()}
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
    # ZeRO-3: the surrogate and its backward must see full parameters (deepspeed-notes.md).
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=layout.stage == 3):
        surrogate = sum((p * grads[name]).sum() for name, p in params.items())
        engine.backward(surrogate)
    del grads, surrogate
    engine.step()
    if skipped:
        layout.restore_moments(snapshot)
    skipped = skipped or not engine.was_step_applied()
    return StepStats(
        loss=query_loss,
        num_prompts=2 * k * n * global_batch,
        num_batches=2 * k * n,
        skipped=skipped,
        extra={"support_loss": support_loss, "query_loss": query_loss},
    )
