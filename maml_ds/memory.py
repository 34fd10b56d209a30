"""Per-GPU memory of MetaICL and MAML-en-LLM: the paper's formula and maml-ds's own model.

The paper (sec. 5.5) counts copies of the parameters, S(theta) = bytes of one copy:
MetaICL peaks at 2*S(theta) (parameters + gradients); MAML at (k+2)*S(theta), with k adapted
copies, one per task (the paper's k is the number of tasks, n in maml-2k-n).

maml-ds processes the n tasks one after another and accumulates their meta-gradients in
DeepSpeed's own gradient buffers, so nothing grows with n. What one rank holds is the list
`COMPONENTS` below: each row says how many bytes it takes, when it is alive (its phase) and
whether DeepSpeed's own estimator counts it. The predicted per-rank peak is

    persistent rows + max(forward/backward rows, all-reduce rows, optimizer-step rows)

because the activations, the adapted copy and the HVP vectors are freed before the optimizer
step, and the step's fp32 gradients and scratch exist only inside it. The rows were checked
against live-tensor counts of real DeepSpeed steps on CPU (docs/memory.md has the numbers and
the command that reproduces them); the MAML rows are assumptions about maml_ds.engine, stated
in docs/memory.md, until `--measure` covers MAML.

Everything here is arithmetic on a `ModelFacts` (parameter counts read from the model's config
on the meta device: nothing is allocated or downloaded) except `count_activation_bytes`, which
runs one forward on the meta device to count what autograd saves, and `measure_metaicl`, which
runs real steps.
"""

from __future__ import annotations

import gc
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from maml_ds.config import ConfigError, MethodSpec, Precision, RunConfig, parse_method

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

Phase = Literal["persistent", "forward/backward", "all-reduce", "optimizer step"]
PHASES: tuple[Phase, ...] = ("persistent", "forward/backward", "all-reduce", "optimizer step")


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


@dataclass(frozen=True)
class Component:
    """One kind of tensor a rank holds while training."""

    key: str
    label: str
    phase: Phase | Callable[[MemorySetup], Phase]
    """When it is alive (a function of the setup where that depends on the ZeRO stage)."""
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


def _gradient_phase(setup: MemorySetup) -> Phase:
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


def _reduce_bucket(facts: ModelFacts, setup: MemorySetup) -> float:
    if setup.zero_stage == 0:
        return 0.0
    return setup.reduce_bucket_size * setup.dtype_bytes


def _zero3_working_set(facts: ModelFacts, setup: MemorySetup) -> float:
    if setup.zero_stage != 3:
        return 0.0
    return facts.largest_layer_params * 2 * setup.dtype_bytes


def _adapted_copy(facts: ModelFacts, setup: MemorySetup) -> float:
    shards = setup.world_size if setup.zero_stage == 3 else 1
    return facts.num_params * setup.dtype_bytes / shards


def _hvp_vectors(facts: ModelFacts, setup: MemorySetup) -> float:
    if setup.effective_second_order != "hvp-fd":
        return 0.0
    shards = setup.world_size if setup.zero_stage == 3 else 1
    return 3 * 4 * facts.num_params / shards


def _activations(facts: ModelFacts, setup: MemorySetup) -> float:
    return activation_bytes(facts, setup)


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
        "gradient at the step. DeepSpeed's ZeRO-3 estimate leaves it out (measured: allocated)",
        in_deepspeed_estimate=lambda s: s.zero_stage != 3,
    ),
    Component(
        "fp32_master", "fp32 master parameters", "persistent",
        _per_param(_fp32_optimizer_copy, partitioned_from=1),
        "DeepSpeed's fp32 copy the optimizer updates (none for fp32 at ZeRO-0)",
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
        "adapted_copy", "adapted parameters theta_j", "forward/backward",
        _adapted_copy,
        "ONE copy, model dtype (ZeRO-3: its shard); tasks run one after another, so it does "
        "not grow with n",
        methods=("maml",),
    ),
    Component(
        "meta_gradient_accumulator", "meta-gradient accumulator", "persistent",
        lambda f, s: 0.0,
        "0: the n tasks' meta-gradients accumulate in DeepSpeed's gradient buffers (row "
        "'gradients') through engine.backward; no extra buffer",
        methods=("maml",),
    ),
    Component(
        "hvp_vectors", "hvp-fd vectors u, g_S, g_S(+eps u)", "forward/backward",
        _hvp_vectors,
        "second order by finite differences: the recursion vector, the support gradient at "
        "theta_j and the perturbed gradient, 3 x fp32 (ZeRO-3: shards); assumption, see "
        "docs/memory.md",
        methods=("maml",),
    ),
    Component(
        "zero3_working_set", "ZeRO-3 gathered layer", "forward/backward",
        _zero3_working_set,
        "the largest layer gathered, with its gradient before reduction (model dtype)",
        in_deepspeed_estimate=lambda s: s.zero_stage == 3,
    ),
    Component(
        "reduce_bucket", "gradient reduction bucket", "forward/backward",
        _reduce_bucket,
        "reduce_bucket_size elements of model dtype (ZeRO 1-3)",
    ),
    Component(
        "activations", "activations", "forward/backward",
        _activations,
        "what autograd saves in one forward of micro-batch x seq-len, plus the logits, counted "
        "on the meta device; support and query passes run one at a time",
    ),
    Component(
        "fp32_gradients", "fp32 gradients", "optimizer step",
        _per_param(_fp32_optimizer_copy, partitioned_from=1),
        "the optimizer's fp32 input, built at the step",
        in_deepspeed_estimate=lambda s: True,
    ),
    Component(
        "allreduce_copy", "gradient all-reduce copy", "all-reduce",
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
    phase: Phase
    bytes: int
    note: str
    in_deepspeed_estimate: bool


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
    vs_num_tasks: list[dict[str, int]]
    """Paper formula and maml-ds's predicted peak for n = 1..max (MAML) or flat (MetaICL)."""
    measured: list[dict[str, Any]] = field(default_factory=list)
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


def component_rows(facts: ModelFacts, setup: MemorySetup) -> list[Row]:
    kind = setup.method_spec.kind
    rows = []
    for c in COMPONENTS:
        size = c.size(facts, setup) if kind in c.methods else 0.0
        phase = c.phase(setup) if callable(c.phase) else c.phase
        rows.append(
            Row(
                c.key,
                c.label,
                phase,
                int(round(size)),
                c.note,
                bool(c.in_deepspeed_estimate(setup)) and kind in c.methods,
            )
        )
    return rows


def predicted_peak(rows: Sequence[Row]) -> tuple[int, dict[str, int]]:
    """persistent + the largest of the transient phases (they never overlap)."""
    phase_bytes = {p: sum(r.bytes for r in rows if r.phase == p) for p in PHASES}
    transient = max(phase_bytes[p] for p in PHASES if p != "persistent")
    return phase_bytes["persistent"] + transient, phase_bytes


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


def build_report(facts: ModelFacts, setup: MemorySetup, *, max_tasks: int = 8) -> MemoryReport:
    setup.validate()
    if setup.seq_len > facts.max_positions > 0:
        raise ConfigError(
            [f"--seq-len {setup.seq_len} exceeds the model's {facts.max_positions} positions"]
        )
    rows = component_rows(facts, setup)
    peak, phases = predicted_peak(rows)
    formula, paper = paper_bytes(facts, setup)
    spec = setup.method_spec
    no_activations = [
        r if r.key != "activations" else Row(**{**asdict(r), "bytes": 0}) for r in rows
    ]
    peak_without_activations, _ = predicted_peak(no_activations)
    vs_n = []
    for n in range(1, max_tasks + 1):
        # maml-ds runs the n tasks one after another: its peak does not depend on n.
        _, p = paper_bytes(facts, setup, n)
        vs_n.append(
            {
                "num_tasks": n,
                "paper_bytes": p,
                "maml_ds_bytes": peak,
                "maml_ds_bytes_without_activations": peak_without_activations,
            }
        )
    notes = []
    if spec.kind == "maml" and setup.zero_stage == 3:
        notes.append("maml_ds.engine currently refuses MAML at ZeRO-3; the rows are the design's")
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
        raise MeasurementUnavailable(
            [
                f"--measure with --method {setup.method}: measuring MAML needs maml_ds.engine "
                "wired into `maml-ds memory` (not done yet); measure --method metaicl, or run "
                "scripts/gpu_check.py"
            ]
        )
    import deepspeed

    from maml_ds import distributed as D
    from maml_ds.config import build_deepspeed_config
    from maml_ds.meta.memory import LiveTensorBytes
    from maml_ds.train import build_optimizer

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
