"""The memory report: `COMPONENTS` summed into a predicted per-rank peak, beside the paper.

The paper (sec. 5.5) counts copies of the parameters, S(theta) = bytes of one copy: MetaICL
peaks at 2*S(theta), MAML at (n+2)*S(theta) with one adapted copy per task (the paper calls the
number of tasks k). maml-ds runs the n tasks one after another, so its peak is flat in n from
n = 2 on. `build_report` puts both side by side with DeepSpeed's own estimate; docs/memory.md.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from maml_ds.config import ConfigError, engine_problems
from maml_ds.memory.facts import ModelFacts, model_facts
from maml_ds.memory.model import (
    COMPONENTS,
    PHASE_GROUPS,
    PHASES,
    MemorySetup,
    Phase,
    PhaseSpec,
    host_bytes,
)


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
    host_bytes: int = 0
    """Pinned host memory per rank beside the device peak (`maml_ds.memory.model.host_bytes`)."""
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
    """The paper's formula: MetaICL 2*S(theta); MAML (n+2)*S(theta) (the paper's k+2, k = n)."""
    s = facts.s_theta(setup.precision)
    spec = setup.method_spec
    if spec.kind != "maml":
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
    kind = "metaicl" if kind == "copy" else kind  # the same update on other data
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
        host_bytes=int(host_bytes(facts, setup)),
        notes=notes,
    )


def memory_report(
    model: str, setup: MemorySetup, *, vocab_size: int | None = None, max_tasks: int = 8
) -> MemoryReport:
    """The report for a model name or folder (`maml_ds.models.model_config`)."""
    return build_report(model_facts(model, vocab_size=vocab_size), setup, max_tasks=max_tasks)
