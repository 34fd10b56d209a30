"""MAML-en-LLM meta-gradient math, pure PyTorch and free of DeepSpeed (docs/meta-gradient.md).

- `meta_gradient`: the meta-gradient of one task, in `exact`, `hvp`, `hvp-fd` or `first-order`
  mode, with SGD or AdamW inner steps.
- Building blocks for callers that cannot run it in one piece (the DeepSpeed engine under ZeRO-3):
  `InnerStepConfig`, `inner_step`, `inner_precondition`, `preconditioned_direction`,
  `reverse_step`, `support_gradient`,
  `query_gradient`, `finite_difference_hvp`, `fd_epsilon`, `default_fd_scale`,
  `RngSnapshot` (same dropout masks when a support loss is evaluated again).
- `SharedMomentAdamW`: the optimizer whose AdamW moments the inner and outer steps share.
- `SecondOrder`, `FdMode`, `OptimizerName`: the mode and optimizer names (RunConfig uses them).
- `LiveTensorBytes`: exact live-tensor memory accounting (peak) on any device; `host_side`
  marks what a GPU run keeps in host memory, `host_copy` puts a tensor there.
- `inner_update_kept`: what share of an inner step survives rounding into a 16-bit forward;
  `stochastic_round`, `stochastic_round_ste`: unbiased rounding into bf16/fp16 (E = x).
"""

from maml_ds.meta.gradient import (
    FD_MODES,
    SECOND_ORDER_MODES,
    AdamWState,
    FdMode,
    InnerStepConfig,
    MetaGradient,
    RngSnapshot,
    SecondOrder,
    SupportGradient,
    default_fd_scale,
    fd_epsilon,
    finite_difference_hvp,
    inner_precondition,
    inner_step,
    meta_gradient,
    new_adamw_state,
    preconditioned_direction,
    query_gradient,
    reverse_step,
    support_gradient,
)
from maml_ds.meta.live_bytes import LiveTensorBytes, host_copy, host_side
from maml_ds.meta.optim import (
    OPTIMIZER_NAMES,
    AdamWMoments,
    OptimizerName,
    SharedMomentAdamW,
    adamw_moments,
    adamw_precondition,
    adamw_update,
    sgd_update,
)
from maml_ds.meta.precision import (
    UpdateRounding,
    inner_update_kept,
    stochastic_round,
    stochastic_round_ste,
)

__all__ = [
    "FD_MODES",
    "OPTIMIZER_NAMES",
    "SECOND_ORDER_MODES",
    "AdamWMoments",
    "AdamWState",
    "FdMode",
    "InnerStepConfig",
    "LiveTensorBytes",
    "MetaGradient",
    "OptimizerName",
    "RngSnapshot",
    "SecondOrder",
    "SharedMomentAdamW",
    "SupportGradient",
    "UpdateRounding",
    "adamw_moments",
    "adamw_precondition",
    "adamw_update",
    "default_fd_scale",
    "host_copy",
    "fd_epsilon",
    "finite_difference_hvp",
    "inner_precondition",
    "inner_step",
    "meta_gradient",
    "new_adamw_state",
    "host_side",
    "inner_update_kept",
    "preconditioned_direction",
    "query_gradient",
    "reverse_step",
    "sgd_update",
    "stochastic_round",
    "stochastic_round_ste",
    "support_gradient",
]
