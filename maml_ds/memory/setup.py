"""`MemorySetup`: the memory-relevant choices of a run, what `maml-ds memory` asks about.

Validated at the edge like RunConfig (one ConfigError listing every problem); the arithmetic on
it is `maml_ds.memory.model`. docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maml_ds.config import (
    AdaptedRounding,
    ConfigError,
    MethodSpec,
    Precision,
    adaptation_problems,
    deepspeed_problems,
    kept_support_gradients,
    parse_method,
)
from maml_ds.memory.facts import DTYPE_BYTES

__all__ = ["MODELLED_SECOND_ORDER", "MemorySetup"]

MODELLED_SECOND_ORDER = ("hvp-fd", "first-order")


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
    activation_checkpointing: bool = False
    """Each layer's activations recomputed in the backward (RunConfig.model)."""
    reduce_bucket_size: int = 50_000_000
    """DeepSpeed's gradient-reduction bucket (elements), as in RunConfig.deepspeed."""
    keep_support_gradients: int | None = None
    """hvp-fd, k >= 2: support gradients kept for the reverse pass (RunConfig.meta; None: k - 1)."""
    adapted_rounding: AdaptedRounding = "nearest"
    """MAML at 16 bits: how the adapted point is rounded (RunConfig.meta)."""

    @property
    def kept_support_gradients(self) -> int:
        """The support gradients a task keeps (hvp-fd, at most k - 1; else 0)."""
        if self.effective_second_order != "hvp-fd":
            return 0
        return kept_support_gradients(self.keep_support_gradients, self.method_spec.num_inner_steps)

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
        out.extend(deepspeed_problems(self.zero_stage, self.precision))
        if self.num_nodes < 1:
            out.append(f"--nodes must be >= 1, got {self.num_nodes}")
        if self.gpus_per_node < 1:
            out.append(f"--gpus must be >= 1, got {self.gpus_per_node}")
        if self.seq_len < 2:
            out.append(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.micro_batch_size < 1:
            out.append(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        out.extend(adaptation_problems(self.keep_support_gradients, self.adapted_rounding))
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
