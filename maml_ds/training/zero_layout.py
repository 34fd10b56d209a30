"""Everything that reads DeepSpeed's undocumented internals, in one adapter.

ZeRO keeps the tensors a MAML inner step must update (this rank's fp32 partition, the moments
keyed by it) in optimizer attributes with no underscore and no promise: `PartitionLayout` maps
them to named partitions, `internals_problems` names any that is missing (a test runs it per
ZeRO stage), and the checkpoint readers know DeepSpeed's file layout. Tested with DeepSpeed
`TESTED_DEEPSPEED`; pyproject pins the minor release. docs/engine.md, "DeepSpeed internals".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import Generator, Tensor

from maml_ds import distributed as D
from maml_ds.config import ConfigError
from maml_ds.meta.live_bytes import host_copy
from maml_ds.meta.optim import AdamWMoments, SharedMomentAdamW
from maml_ds.meta.precision import stochastic_round

__all__ = [
    "TESTED_DEEPSPEED",
    "PartitionLayout",
    "checkpoint_client_state",
    "checkpoint_state_dict",
    "client_optimizer",
    "gradients_are_finite",
    "internals_problems",
    "is_checkpoint_tag",
    "restore_optimizer_state",
    "set_learning_rate_zero",
    "snapshot_optimizer_state",
    "zero_gradients",
]

TESTED_DEEPSPEED = "0.19.8"
"""The DeepSpeed release these internals were read from and tested with (CPU, ZeRO 0-3)."""


def client_optimizer(engine) -> SharedMomentAdamW:
    """The SharedMomentAdamW inside the engine's optimizer wrappers (the `.optimizer` chain)."""
    opt = engine.optimizer
    while not isinstance(opt, SharedMomentAdamW):
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise TypeError("the engine's optimizer is not a SharedMomentAdamW")
    return opt


def set_learning_rate_zero(engine) -> None:
    """lr 0 in every param group of the engine's optimizer, for this step only (the scheduler
    sets lr from its lambda again right after the step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0


def _reduced_gradients(engine, stage: int) -> list[Tensor]:
    """This rank's reduced gradients that `engine.step()` is about to apply (after the boundary
    backward): each parameter's gradient at ZeRO-0 (DeepSpeed's public getter), this rank's
    partitions in the optimizer's `averaged_gradients` at ZeRO 1-3."""
    if stage == 0:
        grads = (deepspeed.utils.safe_get_full_grad(p) for p in engine.module.parameters())
        return [g for g in grads if g is not None]
    out: list[Tensor] = []
    for group in engine.optimizer.averaged_gradients.values():
        if group is None:
            continue
        flat = getattr(group, "flat_partition", None)  # ZeRO-2 may keep one pre-flattened copy
        out += [flat] if flat is not None else [g for g in group if g is not None]
    return out


def gradients_are_finite(engine, stage: int) -> bool:
    """Every rank's reduced gradients are finite (a collective: all ranks call it). Call after
    the boundary backward and before `engine.step()`."""
    local = all(bool(torch.isfinite(g).all()) for g in _reduced_gradients(engine, stage))
    return D.all_reduce_sum(0.0 if local else 1.0) == 0.0


@torch.no_grad()
def zero_gradients(engine, stage: int) -> None:
    """Set the reduced gradients `engine.step()` will apply to zero (a skipped update)."""
    if stage == 0:
        for p in engine.module.parameters():
            if deepspeed.utils.safe_get_full_grad(p) is not None:
                deepspeed.utils.safe_set_full_grad(p, torch.zeros_like(p))
        return
    for g in _reduced_gradients(engine, stage):
        g.zero_()


def snapshot_optimizer_state(engine, *, host: bool = False) -> dict[Tensor, dict[str, Any]]:
    """A copy of this rank's whole client-optimizer state (moments, step counts), keyed by the
    tensors it is kept for (parameters at ZeRO-0, this rank's flat partitions at ZeRO 1-3);
    `host`: in host memory (no device memory; restoring copies it back)."""
    copy = host_copy if host else Tensor.clone
    return {
        owner: {k: copy(v) if isinstance(v, Tensor) else v for k, v in entry.items()}
        for owner, entry in client_optimizer(engine).state.items()
    }


@torch.no_grad()
def restore_optimizer_state(engine, snapshot: Mapping[Tensor, Mapping[str, Any]]) -> None:
    """Put the client-optimizer state back exactly: the same entries (any created since is
    dropped) with the same values, in the same tensors."""
    state = client_optimizer(engine).state
    for owner in [o for o in state if o not in snapshot]:
        del state[owner]
    for owner, saved in snapshot.items():
        entry = state[owner]
        for key in [k for k in entry if k not in saved]:
            del entry[key]
        for key, value in saved.items():
            if isinstance(value, Tensor) and isinstance(entry.get(key), Tensor):
                entry[key].copy_(value)
            else:
                entry[key] = value


# --------------------------------------------------------------------------------------------
# The internals relied on, checked
# --------------------------------------------------------------------------------------------


def _is_list_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _is_list_of_lists_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(_is_list_of(kind)(v) for v in value)


_STAGE_1_2 = {
    "round_robin_bit16_groups": (_is_list_of_lists_of(Tensor), "a list of lists of parameters"),
    "parallel_partitioned_bit16_groups": (
        _is_list_of_lists_of(Tensor),
        "a list (per group) of lists (per rank) of tensors",
    ),
    "round_robin_bit16_offsets": (_is_list_of_lists_of(int), "a list of lists of int offsets"),
    "bit16_groups_flat": (_is_list_of(Tensor), "a list of flat tensors"),
    "single_partition_of_fp32_groups": (_is_list_of(Tensor), "a list of flat fp32 tensors"),
}
_STAGE_3 = {
    "fp16_groups": (_is_list_of_lists_of(Tensor), "a list of lists of parameters"),
    "fp32_partitioned_groups_flat": (_is_list_of(Tensor), "a list of flat fp32 tensors"),
}


def internals_problems(engine, stage: int) -> list[str]:
    """Each DeepSpeed internal this module reads at ZeRO `stage` that is missing or has another
    type, as a sentence naming the attribute and the tested version; [] when all are there."""
    found: list[str] = []

    def need(owner: Any, where: str, attr: str, check: Callable[[Any], bool], what: str) -> Any:
        value = getattr(owner, attr, None)
        if value is None or not check(value):
            got = "missing" if value is None else f"a {type(value).__name__}"
            found.append(f"{where}.{attr} should be {what}, is {got}")
            return None
        return value

    zopt = need(engine, "engine", "optimizer", lambda v: v is not None, "an optimizer")
    if zopt is not None:
        need(zopt, "engine.optimizer", "param_groups", _is_list_of(dict), "a list of dicts")
        try:
            client_optimizer(engine)
        except TypeError:
            found.append("engine.optimizer(.optimizer)* never reaches the SharedMomentAdamW")
        attrs = _STAGE_3 if stage == 3 else _STAGE_1_2 if stage in (1, 2) else {}
        for attr, (check, what) in attrs.items():
            need(zopt, "engine.optimizer", attr, check, what)
        if stage in (1, 2, 3):
            need(zopt, "engine.optimizer", "averaged_gradients", lambda v: isinstance(v, dict),
                 "a dict (group -> this rank's reduced gradients)")  # fmt: skip
        if stage == 3:
            for p in [p for group in getattr(zopt, "fp16_groups", None) or [] for p in group]:
                where = "a ZeRO-3 parameter"
                need(p, where, "ds_tensor", lambda v: isinstance(v, Tensor), "a tensor")
                need(p, where, "ds_shape", lambda v: isinstance(v, torch.Size), "a torch.Size")
                need(p, where, "partition_numel", callable, "a method")
    monitor = need(engine, "engine", "monitor", lambda v: hasattr(v, "enabled"), "a monitor")
    if monitor is not None:
        need(monitor, "engine.monitor", "write_events", callable, "a method")
    return [
        f"DeepSpeed {deepspeed.__version__} (maml_ds.training.zero_layout is tested with "
        f"{TESTED_DEEPSPEED}), ZeRO-{stage}: {problem}"
        for problem in dict.fromkeys(found)
    ]


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
    """This rank's partition of the parameters and of the shared moments (ZeRO 0, 1, 2, 3).

    ZeRO-1/2: the optimizer's flat fp32 partition of each param group; ZeRO-3: the fp32 flat
    of this rank's parameter shards per sub-group; ZeRO-0 (nothing partitioned): contiguous 1/W
    chunks of the flattened parameters, with copies of their slice of the moments.
    """

    def __init__(self, engine, stage: int):
        problems = internals_problems(engine, stage)
        if problems:
            raise RuntimeError("; ".join(problems))
        self.engine = engine
        self.stage = stage
        self.module = engine.module
        self.rank, self.world = D.rank(), D.world_size()
        self.opt = client_optimizer(engine)
        names = {id(p): n for n, p in self.module.named_parameters()}
        self.param_by_name = dict(self.module.named_parameters())
        self.dtype_by_name = {n: _param_dtype(p) for n, p in self.param_by_name.items()}
        self._shadow_module: torch.nn.Module | None = None
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

    @property
    def forward_module(self) -> torch.nn.Module:
        """The module the gather path's `functional_call` runs: the engine's own at ZeRO 0-2, a
        meta-device shadow at ZeRO-3, built on first use (the sharded path never needs it)."""
        if self.stage != 3:
            return self.module
        if self._shadow_module is None:
            self._shadow_module = _shadow(self.module)
        return self._shadow_module

    # ---------------------------------------------------------------- parameters
    def local_params(self) -> dict[str, Tensor]:
        """theta_0 of this rank's partition (fp32 master at ZeRO-1/2/3; a copy at ZeRO-0)."""
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

    def state_owners(self) -> list[Tensor]:
        """The tensors this rank's optimizer state is keyed by: the parameters at ZeRO-0 (in
        `groups[0].names` order), else this rank's partition of each group (`keys` order)."""
        if self.stage == 0:
            return [self.param_by_name[n] for n in self.groups[0].names]
        return list(self._partitions)

    def snapshot_moments(self, *, host: bool = False) -> dict[Tensor, dict[str, Any]]:
        """A copy of this rank's whole optimizer state (to restore when an update is skipped);
        `host`: kept in host memory."""
        return snapshot_optimizer_state(self.engine, host=host)

    def restore_moments(self, snapshot: Mapping[Tensor, Mapping[str, Any]]) -> None:
        """Put the state back exactly: same keys (state created since is dropped), same values."""
        restore_optimizer_state(self.engine, snapshot)


# --------------------------------------------------------------------------------------------
# DeepSpeed's checkpoint files
# --------------------------------------------------------------------------------------------
# ZeRO 1-3 (and the bf16 optimizer) keep the fp32 master weights in `*_optim_states.pt`, which
# DeepSpeed's own `zero_to_fp32` reassembles. A ZeRO-0 checkpoint has no such files (zero_to_fp32
# fails on it): its weights are the `module` entry of `mp_rank_00_model_states.pt`, upcast to
# fp32 (for fp16 runs the fp16 copy, not the fp32 master held in the optimizer state). The
# client state (`engine.save_checkpoint(client_state=...)`) is in that same file, at ZeRO-3 in
# rank 0's `zero_pp_rank_0_mp_rank_00_model_states.pt`.


def is_checkpoint_tag(path: Path) -> bool:
    """`path` is one DeepSpeed checkpoint (a tag folder such as `checkpoints/step6`)."""
    return any(path.glob("*model_states.pt")) or any(path.glob("*_optim_states.pt"))


def checkpoint_state_dict(ckpt_dir: Path, tag: str) -> dict[str, Tensor]:
    """fp32 model weights of DeepSpeed checkpoint `ckpt_dir/tag` (any ZeRO stage)."""
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: v.float() for k, v in state.items()}
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if len(files) != 1:
        raise ConfigError(
            [
                f"{tag_dir}: expected one mp_rank_*_model_states.pt (ZeRO-0, no model "
                f"parallelism), found {len(files)}; is this a DeepSpeed checkpoint of maml-ds?"
            ]
        )
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def checkpoint_client_state(tag_dir: Path) -> dict[str, Any] | None:
    """Rank 0's client state of checkpoint `tag_dir` (DeepSpeed's own keys mixed in: read yours
    by name), or None when the folder has no model-states file."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():  # ZeRO 0-2 / ZeRO-3 (one file per rank)
            return torch.load(tag_dir / name, map_location="cpu", weights_only=False)
    return None


# --------------------------------------------------------------------------------------------
# ZeRO-3 sharded passes (training/sharded.py): a parameter point written into the shards, the
# reduced gradient partition read back. Nothing full-size is built here.
# --------------------------------------------------------------------------------------------
# Shards: each parameter's `ds_tensor`; persistent (small) parameters are released before a
# write and gathered again after it. Gradients: DeepSpeed's public `safe_get_local_grad` /
# `safe_set_local_grad` (each shard of the rank-averaged gradient). docs/engine.md.


def _zero3_params(layout: PartitionLayout) -> list[list[Tensor]]:
    return [[layout.param_by_name[n] for n in group.names] for group in layout.groups]


@torch.no_grad()
def write_zero3_point(
    layout: PartitionLayout, point: Mapping[str, Tensor], rounding: Generator | None = None
) -> None:
    """Make the module compute at `point` (this rank's fp32 partition per group, `layout.keys`):
    every rank writes its own shards, rounded to nearest or, with a `rounding` generator,
    stochastically (`meta.precision.stochastic_round`); a collective (all ranks call it)."""
    offload = layout.engine.optimizer.parameter_offload
    offload.partition_all_parameters()
    for key, group, params in zip(layout.keys, layout.groups, _zero3_params(layout), strict=True):
        assert group.shard_numels is not None
        for p, shard in zip(params, point[key].split(group.shard_numels), strict=True):
            if rounding is not None:
                shard = stochastic_round(shard, p.ds_tensor.dtype, rounding)
            p.ds_tensor.copy_(shard)
    persistent = [p for p in layout.module.parameters() if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(persistent)


def read_zero3_grads(layout: PartitionLayout) -> dict[str, Tensor]:
    """This rank's partition (fp32, per group) of the gradient averaged over ranks by the last
    backward, in new storage."""
    from deepspeed.utils import safe_get_local_grad

    out = {}
    for key, group, params in zip(layout.keys, layout.groups, _zero3_params(layout), strict=True):
        assert group.shard_numels is not None
        flat = torch.zeros(sum(group.shard_numels), dtype=torch.float32, device=D.device())
        # One parameter at a time into the flat: at 16 bits each read is an fp32 copy.
        for p, piece in zip(params, flat.split(group.shard_numels), strict=True):
            grad = safe_get_local_grad(p) if p.requires_grad else None
            if grad is not None:
                piece.copy_(grad.reshape(-1))
            del grad
        out[key] = flat
    return out


@torch.no_grad()
def write_zero3_grads(layout: PartitionLayout, grads: Mapping[str, Tensor]) -> None:
    """Set this rank's gradient partition (the rank-averaged value `engine.step()` applies); the
    step must have run one engine.backward before."""
    from deepspeed.utils import safe_set_local_grad

    for key, group, params in zip(layout.keys, layout.groups, _zero3_params(layout), strict=True):
        assert group.shard_numels is not None
        for p, shard in zip(params, grads[key].split(group.shard_numels), strict=True):
            if p.requires_grad:
                safe_set_local_grad(p, shard)


def clear_zero3_grads(engine) -> None:
    """Forget the gradients of the last backward: the next one is copied, not accumulated."""
    engine.optimizer.zero_grad(set_to_none=True)
