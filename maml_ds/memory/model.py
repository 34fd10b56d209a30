"""Per-GPU memory of MetaICL and MAML-en-LLM: what one rank holds, row by row.

`COMPONENTS` lists the kinds of tensor a rank keeps while training: how many bytes each takes
(from a `ModelFacts` and a `MemorySetup`), in which phases (`PHASES`) it is alive and whether
DeepSpeed's own estimator counts it. The predicted per-rank peak (`maml_ds.memory.report`) is
the persistent rows plus the largest transient phase. Pure arithmetic except the activation
rows (counted on the meta device, `maml_ds.memory.facts`). Every row was checked against
live-tensor counts of real steps; docs/memory.md has the rows, the numbers and the commands.
Edit `COMPONENTS` when the engine changes what it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from maml_ds.memory.facts import ModelFacts, activation_bytes
from maml_ds.memory.setup import MemorySetup

GB = 1e9
"""Reports use decimal gigabytes, as the paper (GPT-2 Medium: S(theta) = 1.42 GB in fp32)."""
DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000
"""DeepSpeed's default ZeRO-3 `sub_group_size`: the optimizer steps the shard in pieces this big."""
DEEPSPEED_ALLREDUCE_BUCKET = 500_000_000
"""Elements per flat copy when ZeRO-0 all-reduces the gradients (DeepSpeed's default)."""

Phase = Literal[
    "persistent",
    "forward/backward",
    "inner step",
    "loss gather",
    "loss forward",
    "loss backward end",
    "moment write-back",
    "meta-gradient gather",
    "engine.backward",
    "all-reduce",
    "optimizer step",
]
PHASES: tuple[Phase, ...] = get_args(Phase)
"""When tensors are alive. MetaICL: persistent, forward/backward, all-reduce, optimizer step.
A MAML meta-update, per task: loss evaluations (support, query, finite-difference passes; one
at a time), each a "loss gather" of the full parameters, a "loss forward" with its activations
and a "loss backward end" with the gradients of the gather; then the "moment write-back" of the
inner steps' moments. After the last task: "meta-gradient gather" of the mean, "engine.backward"
(all-reduces at ZeRO-0) and "optimizer step". docs/memory.md, "What a MAML meta-update adds"."""


# --------------------------------------------------------------------------------------------
# The component list (edit here when the engine changes what it keeps)
# --------------------------------------------------------------------------------------------

SizeFn = Callable[[ModelFacts, MemorySetup], float]
PhaseSpec = Phase | tuple[Phase, ...]
LOSS_PHASES: tuple[Phase, ...] = ("loss gather", "loss forward", "loss backward end")
"""Alive through every loss evaluation of a task (support, query, finite-difference passes)."""
TASK_PHASES: tuple[Phase, ...] = ("inner step", *LOSS_PHASES)
"""Alive through a task's inner steps and loss evaluations."""
UPDATE_PHASES: tuple[Phase, ...] = (
    *TASK_PHASES, "moment write-back", "meta-gradient gather", "engine.backward", "all-reduce",
    "optimizer step",
)  # fmt: skip
"""Alive through the whole meta-update."""


@dataclass(frozen=True)
class Component:
    """One kind of tensor a rank holds while training."""

    key: str
    label: str
    phase: PhaseSpec | Callable[[MemorySetup], PhaseSpec]
    """When it is alive: one phase or several (a function of the setup where that depends on
    the method or the ZeRO stage)."""
    size: SizeFn
    """Bytes on one rank."""
    note: str
    methods: tuple[str, ...] = ("metaicl", "maml")
    """Which method kinds hold it (others show 0)."""
    in_deepspeed_estimate: Callable[[MemorySetup], bool] = lambda s: False
    """Counted by DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (mixed precision)."""


def _per_param(
    bytes_per_param: Callable[[MemorySetup], float], partitioned_from: int | None
) -> SizeFn:
    """Size of a per-parameter tensor; from ZeRO stage `partitioned_from` on, 1/W per rank."""

    def size(facts: ModelFacts, setup: MemorySetup) -> float:
        shards = (
            setup.world_size
            if partitioned_from is not None and setup.zero_stage >= partitioned_from
            else 1
        )
        return facts.num_params * bytes_per_param(setup) / shards

    return size


# ---- sizes of the MAML step's vectors (maml_ds.training.maml; ZeRO-3 by the same code paths)


def sharded_path(setup: MemorySetup) -> bool:
    """MAML on the sharded ZeRO-3 path (`maml_ds.training.sharded.uses_sharded_path`): every
    loss an engine pass at a point written into the shards, nothing full-size on a rank."""
    return (
        setup.is_maml
        and setup.zero_stage == 3
        and setup.effective_second_order in ("hvp-fd", "first-order")
        and setup.precision != "fp16"
    )


def _gather_path(size: SizeFn) -> SizeFn:
    """A row of the gather path (maml.make_loss_fn): 0 on the sharded path."""
    return lambda facts, setup: 0.0 if sharded_path(setup) else size(facts, setup)


def _partition(facts: ModelFacts, setup: MemorySetup) -> float:
    """Q: one fp32 vector of this rank's partition (the engine's `local` tensors: theta_j, the
    AdamW moments of the inner steps, D_j, w = D_j u, theta_j + eps w)."""
    return 4 * math.ceil(facts.num_params / setup.world_size)


def _full_fp32(facts: ModelFacts, setup: MemorySetup) -> float:
    """F: one full-size fp32 vector (the zero-padded flat of every partition that each loss
    evaluation all-reduces, and its gradient)."""
    return 4 * math.ceil(facts.num_params / setup.world_size) * setup.world_size


def _model_copy(facts: ModelFacts, setup: MemorySetup) -> float:
    """G: one full copy in the model dtype."""
    return facts.num_params * setup.dtype_bytes


def _gradient_phase(setup: MemorySetup) -> PhaseSpec:
    if setup.is_maml:
        # No gradient between meta-updates (DeepSpeed frees them at the step); a meta-update
        # creates them once, in engine.backward of the gathered mean meta-gradient (the tasks'
        # sum lives in the engine's own fp32 partition: row 'meta_gradient_accumulator').
        if setup.zero_stage == 0:
            return ("engine.backward", "optimizer step")
        if setup.zero_stage in (1, 2):
            return "engine.backward"
        return "persistent"
    # ZeRO-1/2 convert the reduced model-dtype gradients into the optimizer's fp32 gradient
    # partition and free them before the step (measured); ZeRO-0 and ZeRO-3 keep them through it.
    return "forward/backward" if setup.zero_stage in (1, 2) else "persistent"


def _fp32_optimizer_copy(setup: MemorySetup) -> float:
    # DeepSpeed keeps its own fp32 copy for ZeRO 1-3 even when the model is fp32 (it clones the
    # partition), and for mixed precision at ZeRO-0; a plain fp32 ZeRO-0 run steps p directly.
    return 0.0 if setup.zero_stage == 0 and setup.precision == "fp32" else 4.0


def _optimizer_scratch(facts: ModelFacts, setup: MemorySetup) -> float:
    # SharedMomentAdamW steps one tensor at a time; sqrt(v) and the denominator are two fp32
    # temporaries the size of that tensor. ZeRO-0 hands it the parameters one by one; ZeRO-1/2
    # one flat fp32 partition per param group; ZeRO-3 the shard in sub-groups.
    if setup.zero_stage == 0:
        numel = facts.largest_tensor_params
    else:
        numel = math.ceil(facts.num_params / setup.world_size)
        if setup.zero_stage == 3:
            numel = min(numel, DEEPSPEED_SUB_GROUP_SIZE)
    return 2 * 4 * numel


def _allreduce_copy(facts: ModelFacts, setup: MemorySetup) -> float:
    # ZeRO-0 all-reduces the gradients at the accumulation boundary through flat copies of up to
    # 5e8 elements (measured on 1 rank: the peak of an fp32 ZeRO-0 step).
    if setup.zero_stage != 0:
        return 0.0
    return min(facts.num_params, DEEPSPEED_ALLREDUCE_BUCKET) * setup.dtype_bytes


def _allreduce_phase(setup: MemorySetup) -> PhaseSpec:
    # MAML: the gathered meta-gradient is still alive while engine.backward all-reduces.
    return "engine.backward" if setup.is_maml else "all-reduce"


def _reduce_bucket(facts: ModelFacts, setup: MemorySetup) -> float:
    if setup.zero_stage == 0:
        return 0.0
    return setup.reduce_bucket_size * setup.dtype_bytes


def _zero3_working_set(facts: ModelFacts, setup: MemorySetup) -> float:
    if setup.zero_stage != 3 or (setup.is_maml and not sharded_path(setup)):
        return 0.0
    return facts.largest_layer_params * 2 * setup.dtype_bytes


def _activations(facts: ModelFacts, setup: MemorySetup) -> float:
    return activation_bytes(
        facts,
        seq_len=setup.seq_len,
        micro_batch_size=setup.micro_batch_size,
        precision=setup.precision,
        attn_implementation=setup.attn_implementation,
        activation_checkpointing=setup.activation_checkpointing,
    )


def _activation_phase(setup: MemorySetup) -> PhaseSpec:
    return "loss forward" if setup.is_maml else "forward/backward"


def _reduce_bucket_phase(setup: MemorySetup) -> PhaseSpec:
    # The sharded path reduces in every loss pass; the gather path only in its engine.backward.
    if sharded_path(setup):
        return "loss forward"
    return "engine.backward" if setup.is_maml else "forward/backward"


def _pass_gradient(facts: ModelFacts, setup: MemorySetup) -> float:
    # Sharded path: each pass's gradient, read back from DeepSpeed's partition into an fp32
    # partition of its own (the result of the loss evaluation).
    return _partition(facts, setup) if sharded_path(setup) else 0.0


def _mean_phase(setup: MemorySetup) -> PhaseSpec:
    # Sharded path: the mean is the partition gradient, alive through engine.step().
    if sharded_path(setup):
        return ("meta-gradient gather", "optimizer step")
    return "meta-gradient gather"


# ---- MAML-only rows


def _moment_snapshot(facts: ModelFacts, setup: MemorySetup) -> float:
    # snapshot_moments clones every live moment tensor of this rank: the partition's m and v at
    # ZeRO 1-3, every parameter's m and v at ZeRO-0 (nothing partitioned there). The sharded
    # path keeps it in host memory (pinned CPU tensors): nothing on the GPU.
    if sharded_path(setup):
        return 0.0
    return _per_param(lambda s: 8.0, partitioned_from=1)(facts, setup)


def _replays(setup: MemorySetup) -> bool:
    """hvp-fd with k >= 2: the reverse pass replays inner steps from theta_0."""
    return setup.effective_second_order == "hvp-fd" and setup.method_spec.num_inner_steps >= 2


def _accumulator_phase(setup: MemorySetup) -> PhaseSpec:
    # The engine sums the tasks' meta-gradients in this rank's partition (the first task's
    # result becomes the sum): from n = 2 on it is alive while the later tasks evaluate losses.
    if setup.method_spec.num_tasks >= 2:
        return (*TASK_PHASES, "moment write-back", "meta-gradient gather")
    return "meta-gradient gather"


def _partition_copies(facts: ModelFacts, setup: MemorySetup) -> float:
    # ZeRO-0: PartitionLayout copies this rank's chunk of theta and of the moments m, v.
    return 3 * _partition(facts, setup) if setup.zero_stage == 0 else 0.0


def _inner_state(facts: ModelFacts, setup: MemorySetup) -> float:
    # The AdamW moments after the inner steps (m, v of the partition, new tensors), alive until
    # they are written back into the shared state at the end of the task. The sharded path steps
    # the shared moments in place: nothing, except for the replays (k >= 2) a copy of the
    # moments the task started from.
    if sharded_path(setup) and not _replays(setup):
        return 0.0
    return 2 * _partition(facts, setup)


def _adapted_copy(facts: ModelFacts, setup: MemorySetup) -> float:
    # theta_k for the query pass; with hvp-fd, theta_j + eps*w for the finite-difference pass
    # (one at a time); for k >= 2 the replayed theta_j as well.
    spec = setup.method_spec
    copies = 2 if setup.effective_second_order == "hvp-fd" and spec.num_inner_steps >= 2 else 1
    return copies * _partition(facts, setup)


def _task_result(facts: ModelFacts, setup: MemorySetup) -> float:
    # The task's meta-gradient (an fp32 partition) while the moments are written back; it is
    # then added to the accumulator (or becomes it) and freed.
    return _partition(facts, setup)


def _moment_gather(facts: ModelFacts, setup: MemorySetup) -> float:
    # ZeRO-0 writes the inner moments back by gathering m and v to full size (2 fp32 flats),
    # with the all-reduce clone of the second one while it is made (W > 1).
    if setup.zero_stage != 0:
        return 0.0
    f = _full_fp32(facts, setup)
    return 3 * f if setup.world_size > 1 else 2 * f


def _hvp_vectors(facts: ModelFacts, setup: MemorySetup) -> float:
    # hvp-fd, one-sided: g_S(theta_j) and u, fp32 partitions (the engine copies the partition's
    # gradient out of the full-size flat gradient); w = D_j u is made in D_j's storage and the
    # FD point theta_j + eps w in w's (the adapted-copy row). For k >= 3 the replays hold
    # theta_j and its AdamW state (new at step 0) beside them. The c kept support gradients
    # (--keep-support-gradients, default k - 1) are device partitions on the gather path; the
    # sharded path keeps them in host memory (`host_bytes`) and loads one at a time. Measured
    # (measure-4x256, seq 128, fp32, 1 rank): gather path k = 2: 2 + c partitions (c = 0, 1);
    # k = 4: 3 + c for c = 0, 1, and 1.4 (not 2) more for c = 3, so 3 + c over-predicts by 6%
    # there; sharded path 2, 3, 4 for k = 1, 2, >= 3 whatever c (c = 0 measured equal).
    if setup.effective_second_order != "hvp-fd":
        return 0.0
    k = setup.method_spec.num_inner_steps
    base = 2 if k <= 2 else 3
    if sharded_path(setup):
        return (base + (k >= 2)) * _partition(facts, setup)
    return (base + setup.kept_support_gradients) * _partition(facts, setup)


def host_bytes(facts: ModelFacts, setup: MemorySetup) -> float:
    """Pinned host memory per rank that a GPU run adds (not in the device peak): on the sharded
    path the moment snapshot (m, v of the partition) and the kept support gradients."""
    if not sharded_path(setup):
        return 0.0
    return (2 + setup.kept_support_gradients) * _partition(facts, setup)


def _gathered_parameters(facts: ModelFacts, setup: MemorySetup) -> float:
    # Each loss evaluation gathers the full parameters: the fp32 flat vector itself at fp32 (the
    # parameters are views of it), its model-dtype copies at fp16/bf16 (the flat is freed).
    return _full_fp32(facts, setup) if setup.dtype_bytes == 4 else _model_copy(facts, setup)


def _gather_transient(facts: ModelFacts, setup: MemorySetup) -> float:
    # While gathering: the zero-padded flat and its all-reduced clone (W > 1), and at 16 bits
    # the flat while the model-dtype copies are made.
    f, g = _full_fp32(facts, setup), _model_copy(facts, setup)
    if setup.world_size > 1:
        return f if setup.dtype_bytes == 4 else 2 * f - g
    return 0.0 if setup.dtype_bytes == 4 else f


def _gather_backward(facts: ModelFacts, setup: MemorySetup) -> float:
    # End of every loss evaluation's backward: the split of the flat vector concatenates every
    # parameter's fp32 gradient (at 16 bits: the fp32 casts, the 16-bit ones are freed as they
    # are cast) into one full-size fp32 gradient: 2 full fp32 vectors (measured).
    return 2 * _full_fp32(facts, setup)


def _gathered_meta_gradient(facts: ModelFacts, setup: MemorySetup) -> float:
    # layout.gather(result.grads): full size, fp32 flat at fp32, model-dtype copies at 16 bits.
    return _gathered_parameters(facts, setup)


PHASE_GROUPS: dict[tuple[Phase, ...], str] = {
    LOSS_PHASES: "loss evaluations",
    (*TASK_PHASES, "moment write-back", "meta-gradient gather"): "tasks 2..n, gather",
    (*TASK_PHASES, "moment write-back"): "task",
    TASK_PHASES: "inner steps, loss evaluations",
    UPDATE_PHASES: "meta-update",
    ("meta-gradient gather", "engine.backward"): "meta-gradient to engine",
    ("loss gather", "meta-gradient gather"): "gathers",
    ("loss gather", "loss forward"): "loss gather+forward",
    ("engine.backward", "optimizer step"): "engine.backward, step",
}
"""Display names of the phase sets that MAML rows live in."""


COMPONENTS: tuple[Component, ...] = (
    Component(
        "parameters", "parameters", "persistent",
        _per_param(lambda s: s.dtype_bytes, partitioned_from=3),
        "model dtype; ZeRO-3 keeps a 1/W shard",
        in_deepspeed_estimate=lambda s: True,
    ),
    Component(
        "gradients", "gradients", _gradient_phase,
        _per_param(lambda s: s.dtype_bytes, partitioned_from=2),
        "model dtype; ZeRO-2/3 keep a 1/W partition; at ZeRO-1/2 it is turned into the fp32 "
        "gradient at the step. DeepSpeed's ZeRO-3 estimate leaves it out (measured: allocated). "
        "MAML: made by engine.backward of the gathered meta-gradient",
        in_deepspeed_estimate=lambda s: s.zero_stage != 3,
    ),
    Component(
        "fp32_master", "fp32 master parameters", "persistent",
        _per_param(_fp32_optimizer_copy, partitioned_from=1),
        "DeepSpeed's fp32 copy the optimizer updates (none for fp32 at ZeRO-0); MAML's theta_0 "
        "at ZeRO 1-3 (no copy)",
        in_deepspeed_estimate=lambda s: True,
    ),
    Component(
        "moments", "AdamW moments m, v (shared)", "persistent",
        _per_param(lambda s: 8.0, partitioned_from=1),
        "fp32; ONE state that inner and outer steps share (the paper's two optimizers copy "
        "theirs back and forth)",
        in_deepspeed_estimate=lambda s: True,
    ),
    Component(
        "moment_snapshot", "moment snapshot", UPDATE_PHASES,
        _moment_snapshot,
        "copies of this rank's live moments taken once per meta-update, restored if the update "
        "is skipped: the partition's m, v at ZeRO 1-3 (8P/W), every m, v at ZeRO-0 (8P); the "
        "sharded path keeps it in host memory (0 here)",
        methods=("maml",),
    ),
    Component(
        "meta_gradient_accumulator", "meta-gradient accumulator", _accumulator_phase,
        _partition,
        "the sum of the tasks' meta-gradients, an fp32 partition (the first task's result); "
        "alive during the later tasks' loss evaluations from n = 2 on",
        methods=("maml",),
    ),
    Component(
        "partition_copies", "ZeRO-0 partition copies", TASK_PHASES,
        _partition_copies,
        "ZeRO-0 only: this rank's 1/W chunk of theta and of m, v, copied to fp32 per task",
        methods=("maml",),
    ),
    Component(
        "inner_state", "inner AdamW moments after the inner steps",
        (*TASK_PHASES, "moment write-back"),
        _inner_state,
        "m, v of the partition after the k inner steps (new fp32 tensors, written back into the "
        "shared state at the end of the task); sharded path: the shared moments are stepped in "
        "place, and for hvp-fd with k >= 2 this is the copy the replays start from",
        methods=("maml",),
    ),
    Component(
        "adapted_copy", "adapted parameters theta_k / theta_j + eps*w", TASK_PHASES,
        _adapted_copy,
        "ONE fp32 partition copy (two for hvp-fd with k >= 2); tasks run one after another, so "
        "it does not grow with n",
        methods=("maml",),
    ),
    Component(
        "hvp_vectors", "hvp-fd vectors g_S, u", LOSS_PHASES,
        _hvp_vectors,
        "one-sided finite differences: g_S(theta_j) and u, fp32 partitions (2 x 4P/W; D_j u is "
        "made in D_j's storage, the FD point in D_j u's); k >= 3: the replays' theta_j and "
        "AdamW state; the c kept support gradients (default k - 1; the sharded path keeps them "
        "in host memory and loads one at a time)",
        methods=("maml",),
    ),
    Component(
        "zero3_working_set", "ZeRO-3 gathered layer", _activation_phase,
        _zero3_working_set,
        "the largest layer gathered, with its gradient before reduction (model dtype); MAML: "
        "the sharded path's passes",
        in_deepspeed_estimate=lambda s: s.zero_stage == 3,
    ),
    Component(
        "zero3_gathered_model", "ZeRO-3 gathered model for engine.backward", "engine.backward",
        _gather_path(lambda f, s: _model_copy(f, s) if s.zero_stage == 3 else 0.0),
        "ZeRO-3 only: the meta-gradient's engine.backward runs inside GatheredParameters(all "
        "parameters), materialising the full model (model dtype); not measured",
        methods=("maml",),
    ),
    Component(
        "gathered_parameters", "gathered full parameters", ("loss gather", "loss forward"),
        _gather_path(_gathered_parameters),
        "every loss evaluation all-reduces the zero-padded fp32 partitions into a full flat "
        "vector (4P): the parameters at fp32 are views of it, at 16 bits model-dtype copies",
        methods=("maml",),
    ),
    Component(
        "gather_transient", "gather transient", ("loss gather", "meta-gradient gather"),
        _gather_path(_gather_transient),
        "while gathering: the flat vector and its all-reduced clone (W > 1), or the flat "
        "while the 16-bit copies are made",
        methods=("maml",),
    ),
    Component(
        "activations", "activations", _activation_phase,
        _activations,
        "what autograd saves in one forward of micro-batch x seq-len, plus the logits, counted "
        "on the meta device; support, query and FD passes run one at a time",
    ),
    Component(
        "gather_backward", "gather backward buffers", "loss backward end",
        _gather_path(_gather_backward),
        "end of each loss backward: every parameter's fp32 gradient and their concatenation "
        "(the backward of the split of the flat vector); activations are freed by then",
        methods=("maml",),
    ),
    Component(
        "inner_step_scratch", "inner step: support gradient, AdamW denominator", "inner step",
        lambda f, s: 2 * _partition(f, s),
        "while an inner AdamW step runs: the support gradient g_S(theta_j) and sqrt(v) / its "
        "denominator, fp32 partitions (the new theta_(j+1) is the adapted copy)",
        methods=("maml",),
    ),
    Component(
        "rounded_point", "stochastically rounded point", LOSS_PHASES,
        _gather_path(
            lambda f, s: _partition(f, s)
            if s.adapted_rounding == "stochastic" and s.dtype_bytes == 2
            else 0.0
        ),
        "--adapted-rounding stochastic at 16 bits, gather path: the partition rounded for the "
        "pass (fp32, straight-through), alive through it; the sharded path rounds shard by shard "
        "into the parameters (measured: +Q, and +0 on the sharded path)",
        methods=("maml",),
    ),
    Component(
        "task_result", "the task's meta-gradient", "moment write-back",
        _task_result,
        "result of meta_gradient, an fp32 partition, until it is added to the accumulator",
        methods=("maml",),
    ),
    Component(
        "moment_gather", "ZeRO-0 gathered moments", "moment write-back",
        _moment_gather,
        "ZeRO-0 only: m and v gathered to full size (fp32) to write the inner steps' moments "
        "back into every parameter's state",
        methods=("maml",),
    ),
    Component(
        "meta_gradient_mean", "meta-gradient mean (sum / n)", _mean_phase,
        _partition,
        "the accumulator divided by n, an fp32 partition, while it is gathered (sharded path: "
        "the gradient engine.step() applies)",
        methods=("maml",),
    ),
    Component(
        "pass_gradient", "sharded pass gradient", "loss backward end",
        _pass_gradient,
        "sharded path (ZeRO-3 hvp-fd / first-order): each loss pass's gradient partition, read "
        "back from DeepSpeed into fp32 (safe_get_local_grad)",
        methods=("maml",),
    ),
    Component(
        "gathered_meta_gradient", "gathered meta-gradient",
        ("meta-gradient gather", "engine.backward"),
        _gather_path(_gathered_meta_gradient),
        "gathered to full size once per meta-update for engine.backward(sum(p * g)): the fp32 "
        "flat (4P) at fp32, model-dtype copies at 16 bits",
        methods=("maml",),
    ),
    Component(
        "reduction_working_set", "DeepSpeed reduction working set", "engine.backward",
        lambda f, s: (
            _model_copy(f, s) / s.world_size if s.zero_stage == 1
            else s.dtype_bytes * f.largest_tensor_params if s.zero_stage == 2
            else 0.0
        ),
        "MAML's engine.backward (measured): ZeRO-1 the reduced gradient partition (model dtype, "
        "1/W), ZeRO-2 the largest parameter's gradient while it is copied into the bucket",
        methods=("maml",),
    ),
    Component(
        "reduce_bucket", "gradient reduction bucket", _reduce_bucket_phase,
        _reduce_bucket,
        "reduce_bucket_size elements of model dtype (ZeRO 1-3)",
    ),
    Component(
        "fp32_gradients", "fp32 gradients", "optimizer step",
        _per_param(_fp32_optimizer_copy, partitioned_from=1),
        "the optimizer's fp32 input, built at the step",
        in_deepspeed_estimate=lambda s: True,
    ),
    Component(
        "allreduce_copy", "gradient all-reduce copy", _allreduce_phase,
        _allreduce_copy,
        "ZeRO-0: flat copy of the gradients while they are averaged across ranks",
    ),
    Component(
        "optimizer_scratch", "optimizer step scratch", "optimizer step",
        _optimizer_scratch,
        "two fp32 temporaries of the tensor being stepped (sqrt(v), denominator)",
    ),
)  # fmt: skip
