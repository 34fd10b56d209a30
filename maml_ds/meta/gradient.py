"""The model-agnostic MAML-en-LLM meta-gradient, as pure functions over parameter dicts.

For one task, k inner steps theta_(j+1) = step(theta_j, g_Sj(theta_j)) and the query loss L_Q at
theta_k: u = grad L_Q(theta_k); for j = k-1 .. 0: u <- (1 - alpha*lambda) u - alpha H_Sj (D_j u),
D_j = 1 (SGD) or the AdamW preconditioner (previous moments and v_j constant). `meta_gradient`
computes it in one of four modes; its building blocks are public so the DeepSpeed engine runs
the same math on its partitions, and nothing else re-implements it. docs/meta-gradient.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from maml_ds.meta.optim import (
    OPTIMIZER_NAMES,
    AdamWMoments,
    OptimizerName,
    adamw_moments,
    adamw_precondition,
    adamw_update,
    new_adamw_moments,
    sgd_update,
)

Params = Mapping[str, Tensor]
"""Named tensors: model parameters (or flat partitions of them), gradients, directions."""
AdamWState = dict[str, AdamWMoments]
"""Per-name AdamW moments (step, exp_avg, exp_avg_sq) of the inner steps."""
LossFn = Callable[[dict[str, Tensor], Any], Tensor]
"""loss_fn(params, batch) -> scalar loss; typically torch.func.functional_call on a module."""
GradFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""params -> gradient of a fixed (support) loss at params."""
HvpFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""w -> H w, the Hessian of a fixed (support) loss at a fixed point times w."""
NormFn = Callable[[Params], float]
"""The L2 norm of a dict of tensors (all-reduced over ranks by a partitioned caller)."""
KeepFn = Callable[[dict[str, Tensor]], Callable[[], dict[str, Tensor]]]
"""Stores a kept support gradient; returns the function that gives it back (e.g. a copy in
host memory, loaded to the device again at each use). Default: the tensors themselves."""

SecondOrder = Literal["exact", "hvp", "hvp-fd", "first-order"]
SECOND_ORDER_MODES: tuple[SecondOrder, ...] = ("exact", "hvp", "hvp-fd", "first-order")
FdMode = Literal["one-sided", "central"]
FD_MODES: tuple[FdMode, ...] = ("one-sided", "central")

# Default relative FD step r = ||eps w|| / ||theta|| per (compute dtype, fd_mode): the r with the
# smallest meta-gradient error in the sweep of docs/meta-gradient.md (bench/fd_error.py, tiny
# GPT-2, SGD and AdamW inner steps), on the side of larger steps where two are close. float16:
# measured with SGD inner steps only (fp16 AdamW moments underflow; keep them in fp32).
_DEFAULT_FD_SCALE: dict[tuple[torch.dtype, FdMode], float] = {
    (torch.float64, "one-sided"): 1e-8,
    (torch.float64, "central"): 1e-6,
    (torch.float32, "one-sided"): 1e-5,
    (torch.float32, "central"): 1e-4,
    (torch.bfloat16, "one-sided"): 3e-3,
    (torch.bfloat16, "central"): 3e-3,
    (torch.float16, "one-sided"): 1e-3,
    (torch.float16, "central"): 3e-3,
}


@dataclass(frozen=True)
class InnerStepConfig:
    """The inner (adaptation) update rule, shared by every mode and by the engine.

    Attributes:
        lr: inner learning rate alpha (>= 0).
        optimizer: "sgd" (theta*(1-lr*wd) - lr*g) or "adamw" (decoupled AdamW, torch's ops).
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay lambda, one float or one per parameter name.
    """

    lr: float
    optimizer: OptimizerName = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | Mapping[str, float] = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.lr) and self.lr >= 0):
            problems.append(f"inner_lr must be finite and >= 0, got {self.lr}")
        if self.optimizer not in OPTIMIZER_NAMES:
            problems.append(
                f"inner_optimizer must be one of {OPTIMIZER_NAMES}, got {self.optimizer!r}"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must be two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        decays = (
            self.weight_decay.values()
            if isinstance(self.weight_decay, Mapping)
            else [self.weight_decay]
        )
        if any(wd < 0 for wd in decays):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if problems:
            raise ValueError("; ".join(problems))

    def weight_decay_of(self, name: str) -> float:
        """Weight decay of the parameter called `name`."""
        if isinstance(self.weight_decay, Mapping):
            return self.weight_decay[name]
        return self.weight_decay


@dataclass(frozen=True)
class MetaGradient:
    """Result of `meta_gradient` for one task.

    Attributes:
        grads: the meta-gradient, one tensor per key of `params` (same shapes, dtypes).
        support_loss: mean of the k support losses, each at the theta_j it was taken at
            (detached scalar; NaN when k = 0).
        query_loss: mean of the query losses at theta_k (detached scalar).
        adam_state: the inner AdamW moments after the k inner steps (new tensors; None for SGD
            inner steps). With shared moments, write them back into the optimizer
            (`SharedMomentAdamW.load_inner_state`).
    """

    grads: dict[str, Tensor]
    support_loss: Tensor
    query_loss: Tensor
    adam_state: AdamWState | None = None


class SupportGradient(NamedTuple):
    """Loss and gradient of one batch at one point, and (if asked) an exact HVP there."""

    loss: Tensor  # detached scalar
    grads: dict[str, Tensor]  # detached unless create_graph=True
    hvp: HvpFn | None  # exact Hessian-vector product (double backward); one call only


@dataclass(frozen=True)
class RngSnapshot:
    """The RNG state before a support pass, to re-evaluate that same loss later.

    The recursion evaluates support loss j several times (replays, FD passes, the HVP graph);
    with dropout each evaluation must draw the masks of the first one, or theta_j and the FD
    differences are wrong. `capture()` before the first pass, `with snap.restored():` around the
    others; the global RNG stream is left as it was (torch.random.fork_rng). Covers the CPU and
    the CUDA generators.
    """

    cpu: Tensor
    cuda: tuple[Tensor, ...] = ()

    @classmethod
    def capture(cls) -> RngSnapshot:
        """The current CPU RNG state, and the CUDA ones if CUDA is initialized."""
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state; restore the surrounding RNG state afterwards."""
        with torch.random.fork_rng(devices=range(len(self.cuda)), device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield


# --- small helpers ----------------------------------------------------------------------------


def _global_norm(tensors: Params) -> float:
    """Euclidean norm over all tensors together, accumulated in float64 (one device sync)."""
    norms = [
        torch.linalg.vector_norm(
            t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32
        )
        for t in tensors.values()
    ]
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms])).item()


def _compute_dtype(params: Params) -> torch.dtype:
    """The dtype the model computes in: the autocast dtype if autocast is on, else the params'."""
    param = next(iter(params.values()))
    if param.is_floating_point() and torch.is_autocast_enabled(param.device.type):
        return torch.get_autocast_dtype(param.device.type)
    return param.dtype


def _axpy(x: Params, y: Params, alpha: float) -> dict[str, Tensor]:
    """x + alpha * y, per name."""
    return {name: torch.add(x[name], y[name], alpha=alpha) for name in x}


def _grads(
    outputs: Sequence[Tensor],
    inputs: Params,
    grad_outputs: Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """autograd.grad over a dict of inputs; unused inputs and constant outputs give zeros."""
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if not pairs:
        return {name: torch.zeros_like(t) for name, t in inputs.items()}
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        list(inputs.values()),
        grad_outputs=[g for _, g in pairs],
        create_graph=create_graph,
        materialize_grads=True,
    )
    return dict(zip(inputs, grads, strict=True))


def _leaves(params: Params) -> dict[str, Tensor]:
    """Fresh autograd leaves that alias `params` (no copy)."""
    return {name: p.detach().requires_grad_(True) for name, p in params.items()}


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """Forward passes whose graph will be differentiated twice.

    Fused SDPA kernels (flash / memory-efficient, CPU and GPU) have no double backward and fail
    only at the outer backward; the math kernel is plain differentiable ops. Models that call
    torch's scaled_dot_product_attention (HF attn_implementation="sdpa") pick it up from here.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _explain_double_backward(mode: str) -> Iterator[None]:
    """Turn autograd's 'derivative ... not implemented' into an error that says what to do."""
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        if not (
            ("derivative for" in message and "not implemented" in message)
            or "differentiate twice" in message
        ):
            raise
        raise RuntimeError(
            f"second_order={mode!r} needs double backward through the model, and an op in it has "
            f"none ({err}). maml-ds runs the passes that need it under the math SDPA kernel, "
            "which covers attn_implementation='eager' and 'sdpa'; for other fused kernels load "
            "the model with attn_implementation='eager', or use second_order='hvp-fd' (ordinary "
            "forward/backward passes only) or 'first-order'."
        ) from err


# --- building blocks --------------------------------------------------------------------------


def new_adamw_state(params: Params) -> AdamWState:
    """Fresh inner AdamW moments (zeros, step 0) for every tensor of `params`."""
    return {name: new_adamw_moments(p) for name, p in params.items()}


def _cloned_state(state: AdamWState | None) -> AdamWState | None:
    if state is None:
        return None
    return {
        name: AdamWMoments(
            step=s["step"].clone(), exp_avg=s["exp_avg"].clone(), exp_avg_sq=s["exp_avg_sq"].clone()
        )
        for name, s in state.items()
    }


def _detach_state(state: Mapping[str, AdamWMoments] | None) -> AdamWState | None:
    if state is None:
        return None
    return {
        name: AdamWMoments(
            step=s["step"].detach(),
            exp_avg=s["exp_avg"].detach(),
            exp_avg_sq=s["exp_avg_sq"].detach(),
        )
        for name, s in state.items()
    }


def inner_step(
    params: Params,
    grads: Params,
    config: InnerStepConfig,
    state: Mapping[str, AdamWMoments] | None = None,
    *,
    params_in_place: bool = False,
    state_in_place: bool = False,
) -> tuple[dict[str, Tensor], AdamWState | None]:
    """One inner step theta_(j+1) = step(theta_j, g_j); returns (new params, new AdamW state).

    By default out of place: `params`, `grads` and `state` are left untouched, and the step is
    differentiable when the inputs carry autograd graphs (the `exact` mode), following the
    derivative convention. `params_in_place` / `state_in_place` overwrite working copies instead
    (no autograd). Elementwise per tensor, so `params` may be flat partitions. `state` is
    required for AdamW (the moments before the step) and ignored for SGD (returned state None).
    """
    if config.optimizer == "sgd":
        new_params = {}
        for name, p in params.items():
            new_params[name] = sgd_update(
                p, grads[name], lr=config.lr, weight_decay=config.weight_decay_of(name),
                param_out=p if params_in_place else None,
            )  # fmt: skip
        return new_params, None
    if state is None:
        raise ValueError("inner_step with optimizer='adamw' needs the AdamW state (moments)")
    new_params, new_state = {}, {}
    for name, p in params.items():
        s = state[name]
        new_params[name], exp_avg, exp_avg_sq, step = adamw_update(
            p, grads[name], s["exp_avg"], s["exp_avg_sq"], s["step"],
            lr=config.lr, betas=config.betas, eps=config.eps,
            weight_decay=config.weight_decay_of(name),
            moments_in_place=state_in_place, param_out=p if params_in_place else None,
        )  # fmt: skip
        new_state[name] = AdamWMoments(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    return new_params, new_state


def _moments_after(
    grads: Params, state: Mapping[str, AdamWMoments], config: InnerStepConfig, *, in_place: bool
) -> AdamWState:
    """The AdamW state after an inner step with `grads` (the moments half of `inner_step`)."""
    new_state = {}
    for name, s in state.items():
        exp_avg, exp_avg_sq, step = adamw_moments(
            grads[name], s["exp_avg"], s["exp_avg_sq"], s["step"],
            betas=config.betas, in_place=in_place,
        )  # fmt: skip
        new_state[name] = AdamWMoments(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    return new_state


def inner_precondition(
    state: Mapping[str, AdamWMoments] | None, config: InnerStepConfig
) -> dict[str, Tensor] | None:
    """D_j from the AdamW state *after* inner step j; None (identity) for SGD inner steps."""
    if config.optimizer == "sgd":
        return None
    assert state is not None, "AdamW preconditioner needs the state after the step"
    return {
        name: adamw_precondition(s["exp_avg_sq"], s["step"], betas=config.betas, eps=config.eps)
        for name, s in state.items()
    }


def preconditioned_direction(
    u: Params, state: Mapping[str, AdamWMoments] | None, config: InnerStepConfig
) -> dict[str, Tensor]:
    """w = D_j u from the AdamW state *after* inner step j, each tensor computed in its D_j's
    own storage (D_j is never held whole: one parameter-sized vector fewer than
    `inner_precondition` then a product); u itself (no copy) for SGD. Bit-equal to D_j * u."""
    if config.optimizer == "sgd":
        return dict(u)
    assert state is not None, "AdamW preconditioner needs the state after the step"
    return {
        name: adamw_precondition(
            s["exp_avg_sq"], s["step"], betas=config.betas, eps=config.eps
        ).mul_(u[name])
        for name, s in state.items()
    }


def _adjoint_update(
    u: Params, hw: dict[str, Tensor], config: InnerStepConfig, *, into_hw: bool = False
) -> dict[str, Tensor]:
    """(1 - alpha*lambda) u - alpha * hw; `into_hw` writes it into hw's storage (a finite
    difference's own tensors; autograd may hand one gradient tensor to several inputs)."""
    out = {}
    for name, u_n in u.items():
        decay = 1 - config.lr * config.weight_decay_of(name)
        base = u_n if decay == 1 else u_n * decay
        out[name] = torch.add(base, hw[name], alpha=-config.lr, out=hw[name] if into_hw else None)
    return out


def reverse_step(
    u: Params,
    hvp_fn: HvpFn,
    precond: Params | None,
    config: InnerStepConfig,
) -> dict[str, Tensor]:
    """One step of the reverse recursion, u <- (1 - alpha*lambda) u - alpha * H_Sj(theta_j) (D_j u).

    Args:
        u: the adjoint at theta_(j+1) (the query gradient at theta_k for j = k-1).
        hvp_fn: w -> H_Sj(theta_j) w (exact: `SupportGradient.hvp`; or `finite_difference_hvp`;
            or the engine's own). Under partitioning, it takes and returns this rank's part.
        precond: D_j (`inner_precondition`), None for SGD.
        config: the inner rule (alpha, lambda).

    Returns:
        the adjoint at theta_j; after j = 0, the meta-gradient.
    """
    w = dict(u) if precond is None else {name: precond[name] * u[name] for name in u}
    return _adjoint_update(u, hvp_fn(w), config)


def support_gradient(
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    *,
    create_graph: bool = False,
    rng: RngSnapshot | None = None,
) -> SupportGradient:
    """Loss and gradient of `batch` at `params`; with `create_graph`, also an exact HVP there.

    With `create_graph=True` the forward runs under the math SDPA kernel (double backward) and the
    graph stays alive until `hvp` is called once (or the result is dropped). With `rng`, the
    forward draws its random numbers (dropout) from that snapshot.
    """
    leaves = _leaves(params)
    attention = _double_backward_attention() if create_graph else contextlib.nullcontext()
    rng_ctx = rng.restored() if rng is not None else contextlib.nullcontext()
    with torch.enable_grad(), attention, rng_ctx:
        loss = loss_fn(leaves, batch)
        grads = _grads([loss], leaves, create_graph=create_graph)
    if not create_graph:
        return SupportGradient(loss.detach(), grads, None)

    def hvp(w: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.enable_grad(), _explain_double_backward("hvp"):
            hw = _grads(list(grads.values()), leaves, [w[name] for name in grads])
        grads.clear()  # release the graph with the last references to it
        return hw

    return SupportGradient(loss.detach(), {n: g.detach() for n, g in grads.items()}, hvp)


def query_gradient(
    loss_fn: LossFn, params: Params, query: Sequence[Any]
) -> tuple[Tensor, dict[str, Tensor]]:
    """(mean query loss, its gradient) at `params`; one backward per query batch.

    The gradients accumulate in place (leaf `.grad`), so memory holds one gradient copy
    whatever the number of query batches.
    """
    if not query:
        raise ValueError("query_gradient needs at least one query batch")
    leaves = _leaves(params)
    losses = []
    with torch.enable_grad():
        for batch in query:
            loss = loss_fn(leaves, batch)
            if loss.requires_grad:
                torch.autograd.backward(loss, inputs=list(leaves.values()))
            losses.append(loss.detach())
    grads = {
        name: torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        for name, leaf in leaves.items()
    }
    if len(query) > 1:
        for g in grads.values():
            g.div_(len(query))
    return torch.stack(losses).mean(), grads


def default_fd_scale(dtype: torch.dtype, fd_mode: FdMode) -> float:
    """Default relative FD step r (= ||eps w|| / ||theta||) when the model computes in `dtype`.

    float64 1e-8 / 1e-6, float32 1e-5 / 1e-4, bfloat16 3e-3 / 3e-3, float16 1e-3 / 3e-3
    (one-sided / central); other dtypes get the float32 values.
    """
    fallback = _DEFAULT_FD_SCALE[torch.float32, fd_mode]
    return _DEFAULT_FD_SCALE.get((dtype, fd_mode), fallback)


def fd_epsilon(params_norm: float, direction_norm: float, fd_scale: float) -> float:
    """FD step eps with ||eps w|| = r ||theta|| (r itself if theta = 0); 0 for w = 0.

    Takes global norms so that a partitioned caller can all-reduce them first.
    """
    if direction_norm == 0:
        return 0.0
    return fd_scale * (params_norm if params_norm > 0 else 1.0) / direction_norm


def finite_difference_hvp(
    grad_fn: GradFn,
    params: Params,
    direction: Params,
    *,
    fd_mode: FdMode = "one-sided",
    fd_scale: float | None = None,
    grad_at_params: Params | None = None,
    eps: float | None = None,
    norm_fn: NormFn | None = None,
    overwrite_direction: bool = False,
) -> dict[str, Tensor]:
    """H(theta) w by finite differences of gradients (ordinary forward/backward passes only).

        one-sided: (g(theta + eps w) - g(theta)) / eps          error O(eps), 1 gradient
        central:   (g(theta + eps w) - g(theta - eps w)) / 2eps  error O(eps^2), 2 gradients

    Args:
        grad_fn: params -> gradient of the (support) loss at params.
        params: theta.
        direction: w.
        fd_mode: "one-sided" or "central".
        fd_scale: r; eps = r ||theta|| / ||w|| (`fd_epsilon`). None: `default_fd_scale` of
            the params' dtype, or of the autocast dtype when called under autocast.
        grad_at_params: g(theta) if already computed (one-sided reuses it, else computes it).
        eps: the step itself, overriding fd_scale (e.g. from all-reduced norms).
        overwrite_direction: one-sided: build theta + eps w in w's own storage (w is not read
            again; pass a direction nothing else holds). One parameter-sized vector fewer.
    """
    if fd_mode not in FD_MODES:
        raise ValueError(f"fd_mode must be one of {FD_MODES}, got {fd_mode!r}")
    if eps is None:
        r = default_fd_scale(_compute_dtype(params), fd_mode) if fd_scale is None else fd_scale
        norm = _global_norm if norm_fn is None else norm_fn
        eps = fd_epsilon(norm(params), norm(direction), r)
    if eps == 0:
        return {name: torch.zeros_like(w) for name, w in direction.items()}
    if overwrite_direction and fd_mode == "one-sided":
        point = {n: torch.add(params[n], w, alpha=eps, out=w) for n, w in direction.items()}
        del direction
        plus = grad_fn(point)
    else:
        plus = grad_fn(_axpy(params, direction, eps))
    if fd_mode == "one-sided":
        base = grad_fn(dict(params)) if grad_at_params is None else grad_at_params
        return {name: plus[name].sub_(base[name]).div_(eps) for name in plus}
    minus = grad_fn(_axpy(params, direction, -eps))
    return {name: plus[name].sub_(minus[name]).div_(2 * eps) for name in plus}


# --- the meta-gradient ------------------------------------------------------------------------


def meta_gradient(
    loss_fn: LossFn,
    params: Params,
    support: Sequence[Any],
    query: Sequence[Any],
    *,
    inner_lr: float,
    inner_optimizer: OptimizerName = "sgd",
    second_order: SecondOrder = "exact",
    adam_state: Mapping[str, AdamWMoments] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Mapping[str, float] = 0.0,
    fd_mode: FdMode = "one-sided",
    fd_scale: float | None = None,
    norm_fn: NormFn | None = None,
    keep_support_gradients: int = 0,
    keep_fn: KeepFn | None = None,
    moments_in_place: bool = False,
) -> MetaGradient:
    """Meta-gradient of one task: d L_Q(theta_k(theta)) / d theta after k inner steps.

    theta_0 = params; theta_(j+1) = inner step on support[j] (loss at theta_j); L_Q = mean of the
    query losses at theta_k. Inputs are never modified (but `adam_state` with `moments_in_place`);
    `params` need not require grad.

    Args:
        loss_fn: loss_fn(params, batch) -> scalar loss, with `params` a dict of the same keys
            and shapes as `params` (e.g. `torch.func.functional_call(model, params, ...)`).
        params: theta, named tensors (model parameters, or any tensors the loss takes).
        support: the k support batches, one per inner step (k = 0: plain query gradient).
        query: the query batches (>= 1); the query loss is their mean at theta_k.
        inner_lr: alpha, the inner learning rate.
        inner_optimizer: "sgd" or "adamw" (decoupled, torch.optim.AdamW's update).
        second_order: how the second-order term is computed (all give the same quantity):
            "exact": autograd through the unrolled inner steps (create_graph=True); memory grows
                with k. The reference.
            "hvp": reverse recursion with exact Hessian-vector products (double backward), one
                support graph alive at a time, theta_j recomputed by replaying the inner steps
                from theta (memory flat in k, k(k-1)/2 extra support passes).
            "hvp-fd": the same recursion with finite-difference HVPs (no double backward: works
                with any attention kernel); see `fd_mode`, `fd_scale`.
            "first-order": grad L_Q(theta_k) (FOMAML).
        adam_state: inner AdamW moments per name at the start of the task (with shared moments:
            the optimizer's, `SharedMomentAdamW.inner_state`). None: fresh zeros. Not modified
            (unless `moments_in_place`); the moments after the inner steps are returned in
            `MetaGradient.adam_state`.
        betas, eps: AdamW hyperparameters of the inner steps.
        weight_decay: decoupled weight decay of the inner steps (float or per name).
        fd_mode: "one-sided" (default: reuses the support gradient at theta_j, so one extra
            forward/backward per inner step) or "central" (two, error O(eps^2) instead of O(eps)).
        fd_scale: r = ||eps w|| / ||theta_j|| of the FD step; None: per compute dtype and
            fd_mode (`default_fd_scale`, measured in docs/meta-gradient.md). The compute dtype
            is the params' dtype, or the autocast dtype if meta_gradient runs under autocast;
            autocast entered inside loss_fn is invisible here: pass fd_scale then.
        norm_fn: the L2 norm of a dict of tensors used for the FD step (default: the local
            norm). A caller whose `params` are one rank's partition passes a norm all-reduced
            over the ranks, so that every rank takes the same step.
        keep_support_gradients: hvp-fd with k >= 2: keep the first c = min(this, k - 1)
            support gradients g_S(theta_0) .. g_S(theta_(c-1)) from the forward pass for the
            replays and their reverse steps (c parameter-sized copies alive; c = 1 saves k - 1
            passes per task, c = k - 1 every replay pass: 3k passes; the result is the same).
        keep_fn: where the kept support gradients live (`KeepFn`; default: as they are). Each
            is asked for once per replay that starts from it and once for its reverse step.
        moments_in_place: the inner steps update `adam_state`'s own tensors (e.g. the
            optimizer's live moments: two parameter-sized vectors fewer, nothing to write back);
            the result's adam_state holds those tensors. With k >= 2 the second-order modes keep
            a copy of the starting moments for their replays. Not with "exact" (autograd).

    Second-order modes run the forward passes they differentiate twice under the math SDPA
    kernel, so models with attn_implementation="sdpa" work in "exact" and "hvp"; an op without
    double backward anyway fails with an error that names the modes that work.

    Returns:
        MetaGradient(grads, support_loss, query_loss, adam_state).
    """
    config = InnerStepConfig(
        lr=inner_lr, optimizer=inner_optimizer, betas=betas, eps=eps, weight_decay=weight_decay
    )
    problems = []
    if second_order not in SECOND_ORDER_MODES:
        problems.append(f"second_order must be one of {SECOND_ORDER_MODES}, got {second_order!r}")
    if fd_mode not in FD_MODES:
        problems.append(f"fd_mode must be one of {FD_MODES}, got {fd_mode!r}")
    if keep_support_gradients < 0:
        problems.append(f"keep_support_gradients must be >= 0, got {keep_support_gradients}")
    if fd_scale is not None and not fd_scale > 0:
        problems.append(f"fd_scale must be > 0, got {fd_scale}")
    if len(query) == 0:
        problems.append("query must hold at least one batch")
    if not params:
        problems.append("params is empty")
    if adam_state is not None and inner_optimizer != "adamw":
        problems.append(
            f"adam_state is only used with inner_optimizer='adamw', not {inner_optimizer!r}"
        )
    if adam_state is not None and set(adam_state) != set(params):
        problems.append("adam_state must have the keys of params")
    if moments_in_place and (adam_state is None or second_order == "exact"):
        problems.append("moments_in_place needs adam_state and a mode other than 'exact'")
    if isinstance(weight_decay, Mapping) and not set(params) <= set(weight_decay):
        problems.append("a weight_decay mapping must have every key of params")
    if problems:
        raise ValueError("meta_gradient: " + "; ".join(problems))

    theta0 = {name: p.detach() for name, p in params.items()}
    state0: AdamWState | None = None
    if inner_optimizer == "adamw":
        state0 = new_adamw_state(theta0) if adam_state is None else _detach_state(adam_state)
    support, query = list(support), list(query)
    if second_order == "exact":
        return _exact(loss_fn, theta0, state0, support, query, config)
    return _recursive(
        loss_fn, theta0, state0, support, query, config,
        second_order=second_order, fd_mode=fd_mode, fd_scale=fd_scale, norm_fn=norm_fn,
        num_kept=keep_support_gradients, keep_fn=keep_fn or _kept_as_is,
        moments_in_place=moments_in_place,
    )  # fmt: skip


def _mean_loss(losses: list[Tensor]) -> Tensor:
    return torch.stack(losses).mean() if losses else torch.tensor(float("nan"))


def _exact(
    loss_fn: LossFn,
    theta0: dict[str, Tensor],
    state0: AdamWState | None,
    support: list[Any],
    query: list[Any],
    config: InnerStepConfig,
) -> MetaGradient:
    """Unrolled inner loop (create_graph=True), then one VJP of theta_k with grad L_Q(theta_k)."""
    leaves = _leaves(theta0)
    theta: dict[str, Tensor] = leaves
    state = state0
    support_losses = []
    with torch.enable_grad():
        for batch in support:
            with _double_backward_attention():
                loss = loss_fn(theta, batch)
            grads = _grads([loss], theta, create_graph=True)
            theta, state = inner_step(theta, grads, config, state)
            support_losses.append(loss.detach())
    # The query graphs are not needed for the outer backward: take u = grad L_Q at theta_k
    # with ordinary passes, then pull it back through the unrolled support graphs.
    query_loss, u = query_gradient(loss_fn, theta, query)
    with torch.enable_grad(), _explain_double_backward("exact"):
        meta_grads = _grads(list(theta.values()), leaves, list(u.values()))
    return MetaGradient(meta_grads, _mean_loss(support_losses), query_loss, _detach_state(state))


def _replay(
    loss_fn: LossFn,
    theta0: dict[str, Tensor],
    state0: AdamWState | None,
    batches: list[Any],
    rngs: list[RngSnapshot],
    config: InnerStepConfig,
    kept: Sequence[Callable[[], dict[str, Tensor]]] = (),
) -> tuple[dict[str, Tensor], AdamWState | None]:
    """theta_j and the AdamW state before step j, recomputed from theta_0 over `batches`
    (step i from `kept[i]()`, the support gradient at theta_i kept by the forward pass, when
    there is one)."""
    theta, state = theta0, state0
    for i, (batch, rng) in enumerate(zip(batches, rngs, strict=True)):
        if i < len(kept):
            grads = kept[i]()
        else:
            grads = support_gradient(loss_fn, theta, batch, rng=rng).grads
        # Step 0 reads the caller's theta_0 / state_0; later steps overwrite working copies.
        theta, state = inner_step(
            theta, grads, config, state, params_in_place=i > 0, state_in_place=i > 0
        )
        del grads  # not alive through the next support pass
    return theta, state


def _kept_as_is(grads: dict[str, Tensor]) -> Callable[[], dict[str, Tensor]]:
    return lambda: grads


def _support_grads_only(
    loss_fn: LossFn, batch: Any, rng: RngSnapshot, params: dict[str, Tensor]
) -> dict[str, Tensor]:
    return support_gradient(loss_fn, params, batch, rng=rng).grads


def _forward(
    loss_fn: LossFn,
    theta0: dict[str, Tensor],
    state0: AdamWState | None,
    support: list[Any],
    config: InnerStepConfig,
    *,
    keep_last: bool,
    last_graph: bool,
    num_kept: int = 0,
    keep_fn: KeepFn = _kept_as_is,
    moments_in_place: bool = False,
) -> tuple[
    dict[str, Tensor],
    AdamWState | None,
    list[Tensor],
    list[RngSnapshot],
    tuple[dict[str, Tensor], SupportGradient, AdamWState | None] | None,
    list[Callable[[], dict[str, Tensor]]],
]:
    """The k inner steps without graphs: (theta_k, state_k, support losses, RNG states, last,
    kept).

    `last` = (theta_(k-1), its support gradient, the state after step k-1) for the reverse pass
    (None if not `keep_last` or k = 0); with `last_graph` that support gradient keeps its graph
    for an exact HVP. `kept` = the support gradients at theta_0 .. theta_(c-1), c = min(num_kept,
    k - 1), stored by `keep_fn`: the replays and the reverse steps j < c start from them (one
    partition-sized copy each instead of support passes). `moments_in_place`: step 0 updates
    `state0` itself.
    """
    theta, state = theta0, state0
    losses, rngs = [], []
    last = None
    kept: list[Callable[[], dict[str, Tensor]]] = []
    for j, batch in enumerate(support):
        is_last = j == len(support) - 1
        rngs.append(RngSnapshot.capture())
        sg = support_gradient(loss_fn, theta, batch, create_graph=last_graph and is_last)
        losses.append(sg.loss)
        keep = is_last and keep_last
        theta_j = theta
        # After step 0, theta and state are working copies: overwrite them unless kept.
        theta, state = inner_step(
            theta_j,
            sg.grads,
            config,
            state,
            params_in_place=j > 0 and not keep,
            state_in_place=j > 0 or moments_in_place,
        )
        if keep:
            last = (theta_j, sg, state)
        if j < num_kept and not is_last:
            kept.append(keep_fn(sg.grads))
        del sg, theta_j  # not alive through the next support pass (unless kept above)
    return theta, state, losses, rngs, last, kept


def _recursive(
    loss_fn: LossFn,
    theta0: dict[str, Tensor],
    state0: AdamWState | None,
    support: list[Any],
    query: list[Any],
    config: InnerStepConfig,
    *,
    second_order: SecondOrder,
    fd_mode: FdMode,
    fd_scale: float | None,
    norm_fn: NormFn | None = None,
    num_kept: int = 0,
    keep_fn: KeepFn = _kept_as_is,
    moments_in_place: bool = False,
) -> MetaGradient:
    """`hvp`, `hvp-fd` and `first-order`: forward pass, then the reverse recursion.

    Live memory is a constant number of parameter copies whatever k: theta_j, the last support
    gradient, the AdamW state, u and the HVP's vectors, plus one support graph for `hvp`.
    """
    num_steps = len(support)
    exact_hvp = second_order == "hvp"
    needs_grad_at_theta = exact_hvp or fd_mode == "one-sided" or config.optimizer == "adamw"
    replay_state0 = state0  # the replays of steps j >= 1 start from the moments before step 0
    if moments_in_place and num_steps >= 2 and second_order != "first-order":
        replay_state0 = _cloned_state(state0)
    theta_k, state_k, support_losses, rngs, last, kept = _forward(
        loss_fn, theta0, state0, support, config, keep_last=second_order != "first-order",
        last_graph=exact_hvp,
        num_kept=num_kept if second_order == "hvp-fd" and needs_grad_at_theta else 0,
        keep_fn=keep_fn, moments_in_place=moments_in_place,
    )  # fmt: skip
    query_loss, u = query_gradient(loss_fn, theta_k, query)
    del theta_k  # not needed any more
    if second_order == "first-order":
        return MetaGradient(u, _mean_loss(support_losses), query_loss, state_k)

    # Reverse recursion, j = k-1 .. 0; step j needs theta_j, g_Sj(theta_j) and D_j.
    for j in reversed(range(num_steps)):
        hvp_j: HvpFn | None = None  # "hvp": the exact HVP at theta_j
        grads_j: dict[str, Tensor] | None = None  # g_Sj(theta_j), where a mode needs it
        if last is not None:
            theta_j, sg_j, state_after = last
            grads_j, hvp_j = sg_j.grads, sg_j.hvp
            last = None
            del sg_j
        else:
            theta_j, state_j = _replay(
                loss_fn, theta0, replay_state0, support[:j], rngs[:j], config, kept=kept,
            )  # fmt: skip
            if j < len(kept):  # kept from the forward pass (hvp-fd, k >= 2); later steps
                grads_j = kept.pop()()  # (smaller j) replay only the ones before it
            elif needs_grad_at_theta:
                sg_j = support_gradient(
                    loss_fn, theta_j, support[j], create_graph=exact_hvp, rng=rngs[j]
                )
                grads_j, hvp_j = sg_j.grads, sg_j.hvp
                del sg_j
            state_after = None
            if state_j is not None:
                assert grads_j is not None
                state_after = _moments_after(grads_j, state_j, config, in_place=j > 0)
            del state_j
        # w = D_j u without D_j kept whole; the FD point theta_j + eps w then overwrites w
        # (AdamW: w is ours; SGD: w is u), and u's update overwrites H w.
        w = preconditioned_direction(u, state_after, config)
        del state_after
        if exact_hvp:
            assert hvp_j is not None
            hw = hvp_j(w)
        else:
            hw = finite_difference_hvp(
                functools.partial(_support_grads_only, loss_fn, support[j], rngs[j]),
                theta_j,
                w,
                fd_mode=fd_mode,
                fd_scale=fd_scale,
                norm_fn=norm_fn,
                grad_at_params=grads_j,
                overwrite_direction=config.optimizer == "adamw",
            )
        del theta_j, grads_j, hvp_j, w
        u = _adjoint_update(u, hw, config, into_hw=not exact_hvp)
        del hw
    return MetaGradient(u, _mean_loss(support_losses), query_loss, state_k)
