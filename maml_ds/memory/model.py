"""Per-GPU memory of MetaICL and MAML-en-LLM: the paper's formula and maml-ds's own model.

The paper (sec. 5.5) counts copies of the parameters, S(theta) = bytes of one copy:
MetaICL peaks at 2*S(theta) (parameters + gradients); MAML at (k+2)*S(theta), with k adapted
copies, one per task (the paper's k is the number of tasks, n in maml-2k-n).

maml-ds processes the n tasks one after another and sums their meta-gradients in one fp32
partition per rank (maml_ds.training.maml), so nothing grows with n beyond that sum (present from
n = 2 on). What one rank holds is the list `COMPONENTS` below: each row says how many bytes it
takes, in which phases it is alive (one or several, `PHASES`) and whether DeepSpeed's own
estimator counts it. The predicted per-rank peak is

    persistent rows + max over the transient phases of the rows alive in that phase

(MetaICL: forward/backward, all-reduce, optimizer step; a MAML meta-update: the gather, forward
and end of backward of each loss evaluation, the moment write-back, the gather of the mean
meta-gradient, engine.backward, the optimizer step). Every row was checked against live-tensor
counts of real DeepSpeed steps and meta-updates on CPU (ZeRO 0-3, 1 and 2 ranks, fp32 and
bf16); docs/memory.md has the numbers and the commands that reproduce them.

Everything here is arithmetic on a `ModelFacts` (parameter counts read from the model's config
on the meta device: nothing is allocated or downloaded) except `count_activation_bytes`, which
runs one forward on the meta device to count what autograd saves, and the `measure*` functions,
which run real MetaICL steps (`measure_metaicl`) or real meta-updates through
`maml_ds.training.loop.setup` + `maml_ds.training.maml.maml_step` (`measure_maml`, `measure_update_peak`).
"""

from __future__ import annotations

import gc
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from maml_ds.config import (
    ConfigError,
    MethodSpec,
    Precision,
    RunConfig,
    engine_problems,
    parse_method,
)

GB = 1e9
"""Reports use decimal gigabytes, as the paper (GPT-2 Medium: S(theta) = 1.42 GB in fp32)."""
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TINY_VOCAB = 2048
"""Vocabulary assumed for the tiny built-ins (their tokenizer is trained locally, <= 2048)."""
DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000
"""DeepSpeed's default ZeRO-3 `sub_group_size`: the optimizer steps the shard in pieces this big."""
DEEPSPEED_ALLREDUCE_BUCKET = 500_000_000
"""Elements per flat copy when ZeRO-0 all-reduces the gradients (DeepSpeed's default)."""
MODELLED_SECOND_ORDER = ("hvp-fd", "first-order")

Phase = Literal[
    "persistent",
    "forward/backward",
    "loss gather",
    "loss forward",
    "loss backward end",
    "moment write-back",
    "meta-gradient gather",
    "engine.backward",
    "all-reduce",
    "optimizer step",
]
PHASES: tuple[Phase, ...] = (
    "persistent",
    "forward/backward",
    "loss gather",
    "loss forward",
    "loss backward end",
    "moment write-back",
    "meta-gradient gather",
    "engine.backward",
    "all-reduce",
    "optimizer step",
)
"""When tensors are alive. MetaICL: persistent, forward/backward, all-reduce, optimizer step.
A MAML meta-update (maml_ds.training.maml.maml_step) has, per task, loss evaluations (support, query,
finite-difference passes; one at a time), each of which gathers the full parameters ("loss
gather"), runs the forward with its activations ("loss forward") and ends its backward with the
gradients of the gather ("loss backward end"); then the inner steps' moments are written back
into the shared state ("moment write-back", a gather at ZeRO-0) and the task's meta-gradient is
added to the accumulator. After the last task the mean meta-gradient is gathered
("meta-gradient gather"), fed through "engine.backward" (which all-reduces at ZeRO-0) and
stepped ("optimizer step")."""


# --------------------------------------------------------------------------------------------
# What is being modelled
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of a causal LM, read from its config (parameters counted on the meta device)."""

    name: str
    num_params: int
    """Trainable parameters, each shared tensor once (GPT-2's tied LM head)."""
    largest_layer_params: int
    """Most parameters held directly by one module (DeepSpeed's ZeRO-3 'largest layer')."""
    largest_tensor_params: int
    """The biggest single parameter tensor (the per-tensor optimizer scratch at ZeRO-0)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    max_positions: int

    def s_theta(self, precision: str) -> int:
        """S(theta): bytes of one copy of the parameters in `precision`."""
        return self.num_params * DTYPE_BYTES[precision]


@dataclass(frozen=True)
class MemorySetup:
    """A run's memory-relevant choices (what `maml-ds memory` asks for)."""

    method: str = "metaicl"
    zero_stage: int = 0
    precision: Precision = "fp32"
    num_nodes: int = 1
    gpus_per_node: int = 1
    seq_len: int = 1024
    """Tokens per prompt (MetaICL: up to 1024)."""
    micro_batch_size: int = 1
    """Prompts per rank per forward pass."""
    second_order: str = "hvp-fd"
    """MAML meta-gradient mode; fomaml-* methods are first-order whatever this says."""
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    reduce_bucket_size: int = 50_000_000
    """DeepSpeed's gradient-reduction bucket (elements), as in RunConfig.deepspeed."""

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def method_spec(self) -> MethodSpec:
        return parse_method(self.method)

    @property
    def is_maml(self) -> bool:
        return self.method_spec.kind == "maml"

    @property
    def effective_second_order(self) -> str:
        spec = self.method_spec
        if spec.kind != "maml":
            return "none"
        return "first-order" if spec.first_order else self.second_order

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    def problems(self) -> list[str]:
        out: list[str] = []
        try:
            parse_method(self.method)
        except ConfigError as err:
            out.extend(err.problems)
        if self.zero_stage not in (0, 1, 2, 3):
            out.append(f"--zero must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in DTYPE_BYTES:
            out.append(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.num_nodes < 1:
            out.append(f"--nodes must be >= 1, got {self.num_nodes}")
        if self.gpus_per_node < 1:
            out.append(f"--gpus must be >= 1, got {self.gpus_per_node}")
        if self.seq_len < 2:
            out.append(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.micro_batch_size < 1:
            out.append(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.attn_implementation not in ("eager", "sdpa"):
            out.append(f"--attn must be eager or sdpa, got {self.attn_implementation!r}")
        if self.second_order not in MODELLED_SECOND_ORDER:
            out.append(
                f"--second-order {self.second_order}: the memory model covers "
                f"{' and '.join(MODELLED_SECOND_ORDER)}; exact and hvp keep autograd graphs of "
                "the inner steps whose size depends on the attention kernel (not modelled)"
            )
        return out

    def validate(self) -> MemorySetup:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


# --------------------------------------------------------------------------------------------
# The component list (edit here when the engine changes what it keeps)
# --------------------------------------------------------------------------------------------

SizeFn = Callable[[ModelFacts, MemorySetup], float]
PhaseSpec = Phase | tuple[Phase, ...]
LOSS_PHASES: tuple[Phase, ...] = ("loss gather", "loss forward", "loss backward end")
"""Alive through every loss evaluation of a task (support, query, finite-difference passes)."""
UPDATE_PHASES: tuple[Phase, ...] = (
    *LOSS_PHASES, "moment write-back", "meta-gradient gather", "engine.backward", "all-reduce",
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


# ---- sizes of the engine's vectors (maml_ds.training.maml, ZeRO 0-2; ZeRO-3 by the same code paths)


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
    if setup.zero_stage != 3:
        return 0.0
    return facts.largest_layer_params * 2 * setup.dtype_bytes


def _activations(facts: ModelFacts, setup: MemorySetup) -> float:
    return activation_bytes(facts, setup)


def _activation_phase(setup: MemorySetup) -> PhaseSpec:
    return "loss forward" if setup.is_maml else "forward/backward"


def _reduce_bucket_phase(setup: MemorySetup) -> PhaseSpec:
    return "engine.backward" if setup.is_maml else "forward/backward"


# ---- MAML-only rows


def _moment_snapshot(facts: ModelFacts, setup: MemorySetup) -> float:
    # snapshot_moments clones every live moment tensor of this rank: the partition's m and v at
    # ZeRO 1-3, every parameter's m and v at ZeRO-0 (nothing partitioned there).
    return _per_param(lambda s: 8.0, partitioned_from=1)(facts, setup)


def _accumulator_phase(setup: MemorySetup) -> PhaseSpec:
    # The engine sums the tasks' meta-gradients in this rank's partition (the first task's
    # result becomes the sum): from n = 2 on it is alive while the later tasks evaluate losses.
    if setup.method_spec.num_tasks >= 2:
        return (*LOSS_PHASES, "moment write-back", "meta-gradient gather")
    return "meta-gradient gather"


def _partition_copies(facts: ModelFacts, setup: MemorySetup) -> float:
    # ZeRO-0: PartitionLayout copies this rank's chunk of theta and of the moments m, v.
    return 3 * _partition(facts, setup) if setup.zero_stage == 0 else 0.0


def _inner_state(facts: ModelFacts, setup: MemorySetup) -> float:
    # The AdamW moments after the inner steps (m, v of the partition, new tensors), alive until
    # they are written back into the shared state at the end of the task.
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
    # hvp-fd, one-sided: g_S(theta_j), u, D_j and w = D_j u, fp32 partitions (the engine copies
    # the partition's gradient out of the full-size flat gradient). Reverse steps j < k-1 also
    # hold the AdamW state after step j (new at j = 0, replayed in place for j >= 1) while
    # theta_0 needs no copy: one more partition for k = 2, two for k >= 3.
    if setup.effective_second_order != "hvp-fd":
        return 0.0
    k = setup.method_spec.num_inner_steps
    return (4 if k == 1 else 5 if k == 2 else 6) * _partition(facts, setup)


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
    (*LOSS_PHASES, "moment write-back", "meta-gradient gather"): "tasks 2..n, gather",
    (*LOSS_PHASES, "moment write-back"): "task",
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
        "is skipped: the partition's m, v at ZeRO 1-3 (8P/W), every m, v at ZeRO-0 (8P)",
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
        "partition_copies", "ZeRO-0 partition copies", LOSS_PHASES,
        _partition_copies,
        "ZeRO-0 only: this rank's 1/W chunk of theta and of m, v, copied to fp32 per task",
        methods=("maml",),
    ),
    Component(
        "inner_state", "inner AdamW moments after the inner steps",
        (*LOSS_PHASES, "moment write-back"),
        _inner_state,
        "m, v of the partition after the k inner steps (new fp32 tensors, written back into the "
        "shared state at the end of the task)",
        methods=("maml",),
    ),
    Component(
        "adapted_copy", "adapted parameters theta_k / theta_j + eps*w", LOSS_PHASES,
        _adapted_copy,
        "ONE fp32 partition copy (two for hvp-fd with k >= 2); tasks run one after another, so "
        "it does not grow with n",
        methods=("maml",),
    ),
    Component(
        "hvp_vectors", "hvp-fd vectors g_S, u, D, D*u", LOSS_PHASES,
        _hvp_vectors,
        "one-sided finite differences: g_S(theta_j), u, D_j, D_j u, fp32 partitions (4 x "
        "4P/W; 6 for k >= 2: the replayed AdamW state)",
        methods=("maml",),
    ),
    Component(
        "zero3_working_set", "ZeRO-3 gathered layer", "forward/backward",
        _zero3_working_set,
        "the largest layer gathered, with its gradient before reduction (model dtype)",
        methods=("metaicl",),
        in_deepspeed_estimate=lambda s: s.zero_stage == 3,
    ),
    Component(
        "zero3_gathered_model", "ZeRO-3 gathered model for engine.backward", "engine.backward",
        lambda f, s: _model_copy(f, s) if s.zero_stage == 3 else 0.0,
        "ZeRO-3 only: the meta-gradient's engine.backward runs inside GatheredParameters(all "
        "parameters), materialising the full model (model dtype); not measured",
        methods=("maml",),
    ),
    Component(
        "gathered_parameters", "gathered full parameters", ("loss gather", "loss forward"),
        _gathered_parameters,
        "every loss evaluation all-reduces the zero-padded fp32 partitions into a full flat "
        "vector (4P): the parameters at fp32 are views of it, at 16 bits model-dtype copies",
        methods=("maml",),
    ),
    Component(
        "gather_transient", "gather transient", ("loss gather", "meta-gradient gather"),
        _gather_transient,
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
        _gather_backward,
        "end of each loss backward: every parameter's fp32 gradient and their concatenation "
        "(the backward of the split of the flat vector); activations are freed by then",
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
        "meta_gradient_mean", "meta-gradient mean (sum / n)", "meta-gradient gather",
        _partition,
        "the accumulator divided by n, an fp32 partition, while it is gathered",
        methods=("maml",),
    ),
    Component(
        "gathered_meta_gradient", "gathered meta-gradient",
        ("meta-gradient gather", "engine.backward"),
        _gathered_meta_gradient,
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


# --------------------------------------------------------------------------------------------
# Model facts and activations (meta device: nothing allocated, nothing downloaded)
# --------------------------------------------------------------------------------------------


def load_model_config(name: str, *, vocab_size: int | None = None):
    """A Hugging Face config for a built-in name or a local folder / config.json (no download)."""
    from transformers import AutoConfig

    from maml_ds.models import BUILTIN_NAMES, GPT2_FAMILY, arch_by_name

    if name in EXTRA_CONFIGS:
        return EXTRA_CONFIGS[name]()
    path = Path(name)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError([f"model folder {path} has no config.json"])
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = arch_by_name(name)
    if arch is None:
        known = ", ".join(list(GPT2_FAMILY) + list(BUILTIN_NAMES) + list(EXTRA_CONFIGS))
        raise ConfigError(
            [
                f"unknown model {name!r}: give a built-in config ({known}) or a local folder (or "
                "config.json) of a Hugging Face model; nothing is downloaded"
            ]
        )
    vocab = arch.vocab_size or vocab_size or DEFAULT_TINY_VOCAB
    return arch.to_config(-(-vocab // 64) * 64 if not arch.vocab_size else vocab)


def _meta_model(config, attn_implementation: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def model_facts(name: str, *, vocab_size: int | None = None) -> ModelFacts:
    """Parameter counts of a model, from its config only (built on the meta device)."""
    config = load_model_config(name, vocab_size=vocab_size)
    model = _meta_model(config, "eager", torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]  # each shared tensor once
    largest_layer = max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )

    def attr(*names: str, default: int = 0) -> int:
        for n in names:
            value = getattr(config, n, None)
            if isinstance(value, int):
                return value
        return default

    return ModelFacts(
        name=name,
        num_params=sum(p.numel() for p in params),
        largest_layer_params=int(largest_layer),
        largest_tensor_params=max(p.numel() for p in params),
        num_layers=attr("num_hidden_layers", "n_layer"),
        hidden_size=attr("hidden_size", "n_embd"),
        num_heads=attr("num_attention_heads", "n_head"),
        vocab_size=attr("vocab_size"),
        max_positions=attr("max_position_embeddings", "n_positions", "n_ctx"),
    )


def all_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position (fp16/bf16 logits upcast, as
    maml_ds.losses does). Every token scored: an upper bound of MetaICL's scored tokens, and a
    shape the meta device can run (no data-dependent masking)."""
    vocab = logits.shape[-1]
    scored = logits[:, :-1].reshape(-1, vocab)  # [B*(T-1), V]
    if scored.dtype in (torch.float16, torch.bfloat16):
        scored = scored.float()
    return torch.nn.functional.cross_entropy(scored, input_ids[:, 1:].reshape(-1))


_ACTIVATION_CACHE: dict[tuple, int] = {}


def count_activation_bytes(
    config, *, seq_len: int, micro_batch_size: int, precision: str, attn_implementation: str
) -> int:
    """Bytes autograd saves for backward in one forward + loss, plus the logits tensor.

    Runs the real model on the meta device with a saved-tensors hook and adds each saved
    tensor's storage once (views count their base). SDPA on the meta device takes the math path,
    so for `sdpa` this is the eager-like upper bound.
    """
    model = _meta_model(config, attn_implementation, TORCH_DTYPES[precision])
    model.train()
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    saved: dict[int, tuple[torch.Tensor, int]] = {}
    param_ids = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(t) not in param_ids and id(base) not in param_ids:
            saved[id(base)] = (base, base.numel() * base.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        all_token_loss(logits, ids)
    logits_bytes = logits.numel() * logits.element_size()
    if id(logits) not in saved and (logits._base is None or id(logits._base) not in saved):
        saved[id(logits)] = (logits, logits_bytes)
    return sum(nbytes for _, nbytes in saved.values())


def activation_bytes(facts: ModelFacts, setup: MemorySetup) -> int:
    """`count_activation_bytes` for a model of `model_facts` (cached)."""
    key = (
        facts.name,
        facts.vocab_size,
        setup.seq_len,
        setup.micro_batch_size,
        setup.precision,
        setup.attn_implementation,
    )
    if key not in _ACTIVATION_CACHE:
        config = load_model_config(facts.name, vocab_size=facts.vocab_size)
        _ACTIVATION_CACHE[key] = count_activation_bytes(
            config,
            seq_len=setup.seq_len,
            micro_batch_size=setup.micro_batch_size,
            precision=setup.precision,
            attn_implementation=setup.attn_implementation,
        )
    return _ACTIVATION_CACHE[key]


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    phase: str
    """When it is alive, for display: a phase, or the name of a set of phases (PHASE_GROUPS)."""
    bytes: int
    note: str
    in_deepspeed_estimate: bool
    phases: list[str] = field(default_factory=list)
    """Every phase it is alive in (what the peak is computed from)."""


@dataclass
class MemoryReport:
    model: ModelFacts
    setup: MemorySetup
    s_theta_bytes: int
    """S(theta) in the run's precision."""
    paper_formula: str
    paper_bytes: int
    rows: list[Row]
    model_states_bytes: int
    """Rows DeepSpeed's estimator also counts (MetaICL comparison)."""
    deepspeed_estimate_bytes: int | None
    """DeepSpeed's own estimate (ZeRO-2/3, mixed precision; None where it has none)."""
    predicted_peak_bytes: int
    phase_bytes: dict[str, int]
    """Bytes alive in each phase (persistent rows not included in the others)."""
    peak_phase: str
    """The transient phase the predicted peak falls in."""
    vs_num_tasks: list[dict[str, int]]
    """Paper formula and maml-ds's predicted peak for n = 1..max (MAML) or flat (MetaICL)."""
    measured: list[dict[str, Any]] = field(default_factory=list)
    measure_error: str | None = None
    """Why --measure could not run this setup (e.g. the engine refuses it), if it could not."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["setup"]["world_size"] = self.setup.world_size
        return out


def paper_bytes(
    facts: ModelFacts, setup: MemorySetup, num_tasks: int | None = None
) -> tuple[str, int]:
    """The paper's formula: MetaICL 2*S(theta); MAML (k+2)*S(theta), k = tasks n."""
    s = facts.s_theta(setup.precision)
    spec = setup.method_spec
    if spec.kind == "metaicl":
        return "2*S(theta)", 2 * s
    n = spec.num_tasks if num_tasks is None else num_tasks
    return f"(k+2)*S(theta), k = n = {n}", (n + 2) * s


def _phase_set(spec: PhaseSpec) -> tuple[Phase, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _phase_label(phases: tuple[Phase, ...]) -> str:
    if len(phases) == 1:
        return phases[0]
    return PHASE_GROUPS.get(phases, ", ".join(phases))


def component_rows(facts: ModelFacts, setup: MemorySetup) -> list[Row]:
    kind = setup.method_spec.kind
    rows = []
    for c in COMPONENTS:
        size = c.size(facts, setup) if kind in c.methods else 0.0
        phases = _phase_set(c.phase(setup) if callable(c.phase) else c.phase)
        rows.append(
            Row(
                c.key,
                c.label,
                _phase_label(phases),
                int(round(size)),
                c.note,
                bool(c.in_deepspeed_estimate(setup)) and kind in c.methods,
                list(phases),
            )
        )
    return rows


def predicted_peak(rows: Sequence[Row]) -> tuple[int, dict[str, int]]:
    """persistent + the largest transient phase (a row may be alive in several phases)."""
    peak, phase_bytes, _ = _peak(rows)
    return peak, phase_bytes


def _peak(rows: Sequence[Row]) -> tuple[int, dict[str, int], str]:
    phase_bytes = {p: sum(r.bytes for r in rows if p in (r.phases or [r.phase])) for p in PHASES}
    transient = max((p for p in PHASES if p != "persistent"), key=lambda p: phase_bytes[p])
    return phase_bytes["persistent"] + phase_bytes[transient], phase_bytes, transient


def deepspeed_estimate(facts: ModelFacts, setup: MemorySetup) -> int | None:
    """DeepSpeed's own per-GPU model-state estimate (no offload), ZeRO-2/3 only.

    Its formulas assume mixed precision (16-bit parameters, fp32 optimizer states) and Adam;
    they have no ZeRO-0/1 variant. ZeRO-1 has none in DeepSpeed.
    """
    if setup.precision == "fp32" or setup.zero_stage not in (2, 3):
        return None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        if setup.zero_stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(
                total_params=facts.num_params,
                num_gpus_per_node=setup.gpus_per_node,
                num_nodes=setup.num_nodes,
                cpu_offload=False,
            )
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                total_params=facts.num_params,
                largest_layer_params=facts.largest_layer_params,
                num_gpus_per_node=setup.gpus_per_node,
                num_nodes=setup.num_nodes,
                cpu_offload=False,
                cpu_offload_params=False,
            )
    return int(gpu)


def with_num_tasks(setup: MemorySetup, num_tasks: int) -> MemorySetup:
    """The same setup with n tasks per meta-update (MAML); MetaICL unchanged."""
    spec = setup.method_spec
    if spec.kind != "maml":
        return setup
    prefix = "fomaml" if spec.first_order else "maml"
    return replace(setup, method=f"{prefix}-{2 * spec.num_inner_steps}-{num_tasks}")


def engine_refusal(setup: MemorySetup) -> str | None:
    """The training engine's start-up error for this setup, if any (config.engine_problems)."""
    problems = engine_problems(
        setup.method_spec, setup.zero_stage, setup.precision, setup.second_order
    )
    return "; ".join(problems) if problems else None


def build_report(facts: ModelFacts, setup: MemorySetup, *, max_tasks: int = 8) -> MemoryReport:
    setup.validate()
    if setup.seq_len > facts.max_positions > 0:
        raise ConfigError(
            [f"--seq-len {setup.seq_len} exceeds the model's {facts.max_positions} positions"]
        )
    rows = component_rows(facts, setup)
    peak, phases, peak_phase = _peak(rows)
    formula, paper = paper_bytes(facts, setup)
    spec = setup.method_spec
    vs_n = []
    for n in range(1, max_tasks + 1):
        # Tasks run one after another: from n = 2 on, only DeepSpeed's accumulated gradients
        # of the earlier tasks are added (row meta_gradient_accumulator); flat after that.
        rows_n = rows if spec.kind != "maml" else component_rows(facts, with_num_tasks(setup, n))
        no_activations = [
            r if r.key != "activations" else Row(**{**asdict(r), "bytes": 0}) for r in rows_n
        ]
        _, p = paper_bytes(facts, setup, n)
        vs_n.append(
            {
                "num_tasks": n,
                "paper_bytes": p,
                "maml_ds_bytes": predicted_peak(rows_n)[0],
                "maml_ds_bytes_without_activations": predicted_peak(no_activations)[0],
            }
        )
    notes = []
    refusal = engine_refusal(setup)
    if refusal is not None:
        notes.append(f"maml_ds.training.maml refuses this setup at start-up: {refusal}")
    if spec.kind == "maml":
        notes.append(
            "MAML rows: maml_ds.training.maml as measured on CPU at ZeRO 0-3, 1 and 2 ranks "
            "(docs/memory.md); AdamW inner steps, one-sided finite differences"
        )
    if setup.attn_implementation == "sdpa":
        notes.append("sdpa activations counted on the meta device's math path (an upper bound)")
    return MemoryReport(
        model=facts,
        setup=setup,
        s_theta_bytes=facts.s_theta(setup.precision),
        paper_formula=formula,
        paper_bytes=paper,
        rows=rows,
        model_states_bytes=sum(r.bytes for r in rows if r.in_deepspeed_estimate),
        deepspeed_estimate_bytes=deepspeed_estimate(facts, setup),
        predicted_peak_bytes=peak,
        phase_bytes=phases,
        peak_phase=peak_phase,
        vs_num_tasks=vs_n,
        notes=notes,
    )


def memory_report(
    model: str, setup: MemorySetup, *, vocab_size: int | None = None, max_tasks: int = 8
) -> MemoryReport:
    """The report for a model name or folder (see `load_model_config`)."""
    return build_report(model_facts(model, vocab_size=vocab_size), setup, max_tasks=max_tasks)


# --------------------------------------------------------------------------------------------
# Measurement: real MetaICL steps through deepspeed.initialize (1 process)
# --------------------------------------------------------------------------------------------

MEASURE_MODEL = "measure-4x256"
"""The model `--measure` runs: GPT-2, 4 layers x 256 dims, vocab 4096 (4.2M parameters), small
enough for a laptop, with parameters (not activations) dominating as in real runs."""
MEASURE_SEQ_LEN = 128
MEASURE_BUCKET = 200_000
"""Small reduction buckets for measurement (deepspeed-notes.md: the default dominates small
models)."""


def measure_model_config():
    from maml_ds.models import Gpt2Arch

    return Gpt2Arch(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=256).to_config()


EXTRA_CONFIGS: dict[str, Callable[[], Any]] = {MEASURE_MODEL: measure_model_config}
"""Names `load_model_config` knows beyond maml_ds.models' built-ins."""


class MeasurementUnavailable(ConfigError):
    """--measure cannot run this combination here."""


def measure_precision(precision: str, on_gpu: bool) -> tuple[str, str | None]:
    """The precision to measure with, and a note when it differs (fp16 needs a GPU)."""
    if precision == "fp16" and not on_gpu:
        return "bf16", "fp16 cannot run on CPU: measured with bf16 (same bytes per element)"
    return precision, None


def measure(
    setup: MemorySetup, num_tasks: Sequence[int] = (1, 2, 4, 8), *, seed: int = 0
) -> list[dict[str, Any]]:
    """Measured peak beside the prediction for each n: `measure_maml` for MAML methods,
    `measure_metaicl` for MetaICL. The process group stays up (the caller ends it)."""
    if setup.is_maml:
        return measure_maml(setup, num_tasks, seed=seed)
    return measure_metaicl(setup, num_tasks, seed=seed)


def measure_metaicl(
    setup: MemorySetup,
    num_tasks: Sequence[int] = (1, 2, 4, 8),
    *,
    num_steps: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Peak bytes of real MetaICL steps of the measure model, beside the prediction for it.

    One process (world size 1), the setup's ZeRO stage and precision, small buckets. For each n,
    a MetaICL update accumulates n micro-batches (gradient_accumulation_steps = n): the analogue
    of n tasks, and the prediction is flat in n. CPU: `LiveTensorBytes` (every storage created
    from the model's construction on); GPU: torch.cuda.max_memory_allocated.
    """
    if setup.is_maml:
        return measure_maml(setup, num_tasks, seed=seed)
    import deepspeed

    from maml_ds import distributed as D
    from maml_ds.config import build_deepspeed_config
    from maml_ds.meta.live_bytes import LiveTensorBytes
    from maml_ds.training.loop import build_optimizer

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # The process group stays up (DeepSpeed caches its groups; a re-initialised one breaks
    # them): the caller ends it, e.g. maml_ds.distributed.shutdown() at exit.
    D.init_distributed()
    return _measure_all(
        setup,
        num_tasks,
        num_steps=num_steps,
        seed=seed,
        deepspeed=deepspeed,
        build_deepspeed_config=build_deepspeed_config,
        build_optimizer=build_optimizer,
        LiveTensorBytes=LiveTensorBytes,
    )


def _measure_all(
    setup: MemorySetup, num_tasks: Sequence[int], *, num_steps: int, seed: int, **deps: Any
) -> list[dict[str, Any]]:
    from maml_ds import distributed as D

    on_gpu = D.device().type != "cpu"
    precision, note = measure_precision(setup.precision, on_gpu)
    seq_len = min(setup.seq_len, MEASURE_SEQ_LEN)
    facts = model_facts(MEASURE_MODEL)
    results = []
    for n in num_tasks:
        predict_setup = MemorySetup(
            method="metaicl",
            zero_stage=setup.zero_stage,
            precision=precision,
            seq_len=seq_len,
            micro_batch_size=setup.micro_batch_size,
            attn_implementation=setup.attn_implementation,
            reduce_bucket_size=MEASURE_BUCKET,
        )
        predicted = build_report(facts, predict_setup).predicted_peak_bytes
        measured = _measure_one(
            n,
            predict_setup,
            num_steps=num_steps,
            seed=seed,
            on_gpu=on_gpu,
            device=D.device(),
            **deps,
        )
        results.append(
            {
                "num_tasks": n,
                "model": MEASURE_MODEL,
                "num_params": facts.num_params,
                "seq_len": seq_len,
                "precision": precision,
                "zero_stage": setup.zero_stage,
                "counter": "torch.cuda.max_memory_allocated" if on_gpu else "LiveTensorBytes",
                "measured_peak_bytes": measured,
                "predicted_peak_bytes": predicted,
                "ratio": measured / predicted,
                "paper_bytes": paper_bytes(facts, predict_setup)[1],
                "method": "metaicl",
                "note": note,
            }
        )
    return results


def _measure_one(
    num_micro: int,
    setup: MemorySetup,
    *,
    num_steps: int,
    seed: int,
    on_gpu: bool,
    deepspeed,
    build_deepspeed_config,
    build_optimizer,
    LiveTensorBytes,
    device,
) -> int:
    from transformers import GPT2LMHeadModel

    gc.collect()
    cfg = RunConfig(method="metaicl", max_steps=num_steps, seed=seed)
    ds = cfg.deepspeed
    ds.zero_stage, ds.precision = setup.zero_stage, setup.precision
    ds.micro_batch_size, ds.gradient_accumulation_steps = setup.micro_batch_size, num_micro
    ds.reduce_bucket_size = ds.allgather_bucket_size = MEASURE_BUCKET
    config = measure_model_config()
    config._attn_implementation = setup.attn_implementation
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(
        0, config.vocab_size, (setup.micro_batch_size, setup.seq_len), generator=generator
    ).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = tmp
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            counter = None
        else:
            counter = LiveTensorBytes()
            counter.__enter__()
        try:
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
            engine, *_ = deepspeed.initialize(
                model=model,
                optimizer=build_optimizer(cfg, model),
                config=build_deepspeed_config(cfg, 1),
            )
            # The peak of the training steps (what the model predicts): initialisation's
            # transient copies are not part of it; what initialize left alive is.
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            else:
                counter.reset_peak()
            for _ in range(num_steps):
                for m in range(num_micro):
                    engine.set_gradient_accumulation_boundary(m == num_micro - 1)
                    logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                    loss = all_token_loss(logits, ids)
                    del logits
                    engine.backward(loss)
                    del loss
                engine.step()
            if on_gpu:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = counter.peak_bytes
            del engine, model
        finally:
            if counter is not None:
                counter.__exit__(None, None, None)
    gc.collect()
    return int(peak)


# --------------------------------------------------------------------------------------------
# Measurement: real MAML meta-updates through maml_ds.training.loop.setup + maml_ds.training.maml.maml_step
# --------------------------------------------------------------------------------------------

MEASURE_DEMONSTRATIONS = 32
"""Demonstrations per prompt when measuring MAML: enough that every prompt of the synthetic
suite fills MEASURE_SEQ_LEN tokens (with MetaICL's 16 one family stays ~105 tokens)."""


@dataclass(frozen=True)
class MeasureFixture:
    data_dir: str
    tokenizer_dir: str
    model_dir: str


def measure_fixture(root: Path, seed: int = 0) -> MeasureFixture:
    """A small synthetic suite, a BPE tokenizer trained on it and the measure model, on disk
    (what `maml_ds.training.loop.setup` reads; nothing is downloaded). Under a second."""
    from transformers import GPT2LMHeadModel

    from maml_ds.data.synth import SMALL_SUITE, write_synthetic_suite
    from maml_ds.models import iter_data_texts, train_bpe_tokenizer

    data, tok, model = root / "data", root / "tokenizer", root / "model"
    write_synthetic_suite(data, seed=seed, **{**SMALL_SUITE, "test_examples_per_task": 4})
    train_bpe_tokenizer(iter_data_texts(data), vocab_size=512).save_pretrained(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GPT2LMHeadModel(measure_model_config()).save_pretrained(model)
    return MeasureFixture(str(data), str(tok), str(model))


def measure_maml(
    setup: MemorySetup, num_tasks: Sequence[int] = (1, 2, 4, 8), *, seed: int = 0
) -> list[dict[str, Any]]:
    """Peak bytes of one real meta-update of the measure model per n, beside the prediction.

    For each n: `maml_ds.training.loop.setup` (a fresh DeepSpeed engine, this process's world size,
    the setup's ZeRO stage and precision, buckets of MEASURE_BUCKET elements) on a synthetic
    suite written to a temporary folder, one warm-up `maml_ds.training.maml.maml_step` (optimizer state
    and the engine's layout exist from there on), then the peak of one more. CPU:
    `LiveTensorBytes` over everything `setup` creates (parameters a folder load does not create
    through torch ops are added); GPU: torch.cuda.max_memory_allocated. What the engine refuses
    at start-up (maml_ds.config.engine_problems) raises MeasurementUnavailable with its reason.
    """
    import deepspeed

    from maml_ds import distributed as D

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    on_gpu = deepspeed.get_accelerator().device_name() != "cpu"
    precision, note = measure_precision(setup.precision, on_gpu)
    base = replace(
        setup,
        precision=precision,  # type: ignore[arg-type]
        seq_len=min(setup.seq_len, MEASURE_SEQ_LEN),
        num_nodes=1,
        gpus_per_node=1,
        reduce_bucket_size=MEASURE_BUCKET,
    ).validate()
    refusal = engine_refusal(base)  # before anything is started
    if refusal is not None:
        raise MeasurementUnavailable(
            [
                f"--measure --method {setup.method} --zero {setup.zero_stage} --precision "
                f"{precision}: maml_ds.training.maml refuses this at start-up, nothing to measure: "
                f"{refusal}"
            ]
        )
    D.init_distributed()
    base = replace(base, gpus_per_node=D.world_size())
    facts = model_facts(MEASURE_MODEL)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fixture = measure_fixture(Path(tmp), seed)
        for n in num_tasks:
            setup_n = with_num_tasks(base, n)
            predicted = build_report(facts, setup_n)
            measured = _measure_maml_one(
                setup_n, fixture, Path(tmp) / f"run-n{n}", seed=seed, on_gpu=on_gpu
            )
            results.append(
                {
                    "num_tasks": n,
                    "method": setup_n.method,
                    "model": MEASURE_MODEL,
                    "num_params": facts.num_params,
                    "seq_len": setup_n.seq_len,
                    "precision": precision,
                    "zero_stage": setup_n.zero_stage,
                    "world_size": setup_n.world_size,
                    "counter": "torch.cuda.max_memory_allocated" if on_gpu else "LiveTensorBytes",
                    "measured_peak_bytes": measured,
                    "predicted_peak_bytes": predicted.predicted_peak_bytes,
                    "predicted_peak_phase": predicted.peak_phase,
                    "ratio": measured / predicted.predicted_peak_bytes,
                    "paper_bytes": paper_bytes(facts, setup_n, n)[1],
                    "note": note,
                }
            )
    return results


def _uncounted_parameter_bytes(module: torch.nn.Module, counter: Any) -> int:
    """Bytes of parameter storages the counter did not see created (a model loaded from a
    folder gets storages from the file loader, not from torch ops), each storage once."""
    live = counter._live  # data_ptr -> bytes of the storages it counts
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        storage = p.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0 or ptr in seen or ptr in live:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total


def _measure_maml_one(
    setup: MemorySetup, fixture: MeasureFixture, out_dir: Path, *, seed: int, on_gpu: bool
) -> int:
    cfg = RunConfig(method=setup.method, max_steps=2, seed=seed, out_dir=str(out_dir))
    cfg.model.name, cfg.model.tokenizer = fixture.model_dir, fixture.tokenizer_dir
    cfg.model.attn_implementation = setup.attn_implementation
    cfg.data.data_dir = fixture.data_dir
    cfg.data.num_demonstrations = MEASURE_DEMONSTRATIONS
    cfg.data.max_length = setup.seq_len
    cfg.data.max_length_per_example = min(64, setup.seq_len)
    cfg.meta.second_order = setup.second_order  # type: ignore[assignment]
    ds = cfg.deepspeed
    ds.zero_stage, ds.precision = setup.zero_stage, setup.precision
    ds.micro_batch_size = setup.micro_batch_size
    ds.reduce_bucket_size = ds.allgather_bucket_size = setup.reduce_bucket_size
    return measure_update_peak(cfg, on_gpu=on_gpu)


def measure_update_peak(cfg: RunConfig, *, on_gpu: bool | None = None) -> int:
    """This rank's peak bytes of one training update of `cfg` (MetaICL step or MAML
    meta-update) after one warm-up update: `maml_ds.training.loop.setup` + the method's step function.

    CPU: `LiveTensorBytes` over everything from `setup` on (parameter storages a folder load
    creates outside torch ops are added); GPU: torch.cuda.max_memory_allocated over the updates
    minus what was allocated before `setup`. `cfg.deterministic` is turned off (it would set
    process-wide torch flags).
    """
    from maml_ds import distributed as D
    from maml_ds.meta.live_bytes import LiveTensorBytes
    from maml_ds.training.loop import setup as train_setup
    from maml_ds.training.loop import step_function

    if on_gpu is None:
        import deepspeed

        on_gpu = deepspeed.get_accelerator().device_name() != "cpu"
    cfg.deterministic = False
    gc.collect()
    counter = None
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    else:
        counter = LiveTensorBytes().__enter__()
    try:
        ctx = train_setup(cfg)
        uncounted = 0 if counter is None else _uncounted_parameter_bytes(ctx.engine.module, counter)
        step = step_function(ctx)
        step(ctx)  # warm-up: moments, the engine's layout, DeepSpeed's buffers
        D.barrier()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            counter.reset_peak()
        step(ctx)
        if on_gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = counter.peak_bytes + uncounted
        del ctx, step
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    gc.collect()
    return int(peak)
