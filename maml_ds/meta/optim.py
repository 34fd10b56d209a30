"""Per-tensor inner/outer update rules and the shared-moment AdamW optimizer.

The update math lives here once, per tensor and elementwise, so it works on whole parameters,
on the flat fp32 partitions ZeRO-1/2 hand to a client optimizer, and on ZeRO-3 shards:
`adamw_update` (torch.optim.AdamW's op order, so the outer step is bit-equal to it; also out of
place and differentiable for the inner loop, with the MAML-en-LLM derivative convention),
`sgd_update`, and `adamw_precondition` (D_j). `SharedMomentAdamW` is the optimizer DeepSpeed
drives: `step()` the outer update, `inner_step()` the adaptation step on the same state.
docs/meta-gradient.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor

OptimizerName = Literal["sgd", "adamw"]
OPTIMIZER_NAMES: tuple[OptimizerName, ...] = ("sgd", "adamw")


class AdamWMoments(TypedDict):
    """AdamW state of one tensor; the same keys as torch.optim.AdamW's `optimizer.state[p]`."""

    step: Tensor  # float32 scalar, number of updates applied to these moments
    exp_avg: Tensor  # m, shape of the parameter
    exp_avg_sq: Tensor  # v, shape of the parameter


def new_adamw_moments(param: Tensor) -> AdamWMoments:
    """Fresh AdamW state for `param` (zeros, step 0), laid out like torch.optim.AdamW's."""
    return AdamWMoments(
        # On the CPU like torch.optim.AdamW's (non-capturable) step: reading it does not sync.
        step=torch.zeros((), dtype=torch.float32),
        exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
        exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
    )


def _bias_corrections(step: float, betas: tuple[float, float]) -> tuple[float, float]:
    """(1 - beta1^t, sqrt(1 - beta2^t)) in Python floats, as torch.optim.AdamW computes them."""
    beta1, beta2 = betas
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


def adamw_moments(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    betas: tuple[float, float],
    in_place: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The AdamW moment update of one tensor; returns (exp_avg, exp_avg_sq, step).

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   step = step + 1

    torch.optim.AdamW's ops (lerp, mul + addcmul). Derivative convention: the incoming moments
    and the new v are constants; the new m carries the derivative (1 - b1) of `grad` if `grad` is
    in an autograd graph. `in_place` updates the three state tensors in place (no autograd).
    """
    beta1, beta2 = betas
    if in_place:
        assert not (torch.is_grad_enabled() and grad.requires_grad), "in-place: no autograd"
    grad_constant = grad.detach()
    m_out, v_out = (exp_avg, exp_avg_sq) if in_place else (None, None)
    step = step.add_(1) if in_place else step + 1
    # m_j = lerp(m_(j-1), g_j, 1 - b1): derivative (1 - b1) through g_j only.
    exp_avg = torch.lerp(exp_avg.detach(), grad, 1 - beta1, out=m_out)
    exp_avg_sq = torch.mul(exp_avg_sq.detach(), beta2, out=v_out)
    exp_avg_sq = torch.addcmul(exp_avg_sq, grad_constant, grad_constant, value=1 - beta2, out=v_out)
    return exp_avg, exp_avg_sq, step


def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    moments_in_place: bool = False,
    param_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decoupled AdamW step on one tensor; returns (param, exp_avg, exp_avg_sq, step).

        t = step + 1
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        param <- param * (1 - lr*wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    The ops and their order are those of torch.optim.AdamW (foreach=False), so with
    `moments_in_place=True, param_out=param` the result is bit-equal to it.

    Derivative convention (docs/meta-gradient.md): the incoming moments and the new
    second moment are constants; only the current gradient's term (1 - b1) g carries a derivative.
    So if `grad` is part of an autograd graph (inner loop with create_graph=True), the returned
    param is differentiable with respect to `param` and `grad`, with
    d param_new / d grad = -lr * adamw_precondition(v_new, t).

    Args:
        param, grad, exp_avg, exp_avg_sq: tensors of one shape (any shape, incl. flat 1-D).
        step: float32 scalar tensor, updates applied so far to these moments.
        lr, betas, eps, weight_decay: AdamW hyperparameters (weight decay decoupled).
        moments_in_place: update exp_avg, exp_avg_sq and step in place (no autograd then),
            otherwise return new tensors and leave the inputs untouched.
        param_out: where to write the new parameter: None for a new tensor, `param` for in place,
            or another buffer of the same shape (no autograd unless None).
    """
    exp_avg, exp_avg_sq, step = adamw_moments(
        grad, exp_avg, exp_avg_sq, step, betas=betas, in_place=moments_in_place
    )
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step.item(), betas)
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    base = param if weight_decay == 0 else torch.mul(param, 1 - lr * weight_decay, out=param_out)
    param = torch.addcdiv(base, exp_avg, denom, value=-step_size, out=param_out)
    return param, exp_avg, exp_avg_sq, step


def adamw_precondition(
    exp_avg_sq: Tensor, step: Tensor, *, betas: tuple[float, float], eps: float
) -> Tensor:
    """D_j = (1 - b1) / ((1 - b1^t) (sqrt(v_j / (1 - b2^t)) + eps)), elementwise.

    `exp_avg_sq` and `step` are the state *after* inner step j (v_j, t). Under the derivative
    convention, d theta_(j+1) / d g_j = -lr * diag(D_j).
    """
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step.item(), betas)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return denom.reciprocal_().mul_((1 - betas[0]) / bias_correction1)


def sgd_update(
    param: Tensor,
    grad: Tensor,
    *,
    lr: float,
    weight_decay: float,
    param_out: Tensor | None = None,
) -> Tensor:
    """One SGD step with decoupled weight decay: param * (1 - lr*wd) - lr * grad.

    Differentiable in `param` and `grad` when `param_out` is None; `param_out` as in `adamw_update`.
    """
    base = param if weight_decay == 0 else torch.mul(param, 1 - lr * weight_decay, out=param_out)
    return torch.add(base, grad, alpha=-lr, out=param_out)


class SharedMomentAdamW(torch.optim.Optimizer):
    """AdamW whose moments are shared by the outer (meta) step and the inner (adaptation) step.

    MAML-en-LLM (paper sec. 3.3, Algorithm 1) keeps ONE AdamW state per tensor, `exp_avg`,
    `exp_avg_sq` and a per-tensor `step` in `self.state[p]`, that both the inner steps and the
    outer step read and update. Every update of the moments, inner or outer, counts one step for
    bias correction.

    - `step()` is the outer update from `p.grad` (the meta-gradient). With
      `outer_optimizer="adamw"` and no inner step in between it is bit-equal to
      `torch.optim.AdamW(..., foreach=False)` with the same hyperparameters.
    - `inner_step(params, grads, inner_lr=...)` is the adaptation step: it returns the adapted
      tensors (new tensors, or written into `out`) and updates the inner moments in place. The
      inner learning rate is separate; betas, eps and weight_decay come from the param group.
    - `inner_state(named_params)` / `load_inner_state(named_params, state)` hand the inner moments
      to and from the pure functions in `maml_ds.meta.gradient` (`meta_gradient(adam_state=...)`).

    Table 5 ablation (paper sec. 5.3), chosen at construction:

    ==============================  ===================================================
    inner, outer, share_moments     behaviour
    ==============================  ===================================================
    adamw, adamw, True  (default)   one state; inner and outer steps update it
    adamw, adamw, False  ("(d)")    outer state persists; the inner state (separate keys
                                    `inner_*`) starts fresh at each meta-update: `step()`
                                    drops it for the tensors it updates
    sgd,   adamw, False             stateless inner SGD; outer AdamW state persists
    adamw, sgd,   False             fresh inner AdamW per meta-update; plain outer SGD
    sgd,   sgd,   False             no state at all
    ==============================  ===================================================

    SGD steps use decoupled weight decay, p * (1 - lr*wd) - lr * g, like the inner SGD step.

    Under DeepSpeed: ZeRO-1/2 hand each param group ONE flat fp32 partition per rank and every op
    here is elementwise, so partitions work. ZeRO-3 calls `step()` once per sub-group and leaves
    `param_groups` empty outside `step()`: counts are per tensor, and `inner_step` falls back to
    the constructor's hyperparameters for tensors that are in no param group at that moment.
    `state_dict()` / `load_state_dict()` are torch's: the state holds tensors only (like any
    key but "step", torch casts `inner_step` to the parameter dtype on load: exact for fp32).

    Args:
        params: parameters or param groups, as for torch.optim.AdamW.
        lr: outer learning rate (beta in the paper).
        betas, eps, weight_decay: AdamW hyperparameters, shared by inner and outer AdamW steps.
        inner_optimizer: "adamw" or "sgd", the rule of `inner_step`.
        outer_optimizer: "adamw" or "sgd", the rule of `step`.
        share_moments: one state for inner and outer steps; needs both optimizers "adamw".
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        inner_optimizer: OptimizerName = "adamw",
        outer_optimizer: OptimizerName = "adamw",
        share_moments: bool = True,
    ) -> None:
        problems = []
        if lr < 0:
            problems.append(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            problems.append(f"betas must lie in [0, 1), got {betas}")
        if eps <= 0:
            problems.append(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {weight_decay}")
        choices = {"inner_optimizer": inner_optimizer, "outer_optimizer": outer_optimizer}
        for name, value in choices.items():
            if value not in OPTIMIZER_NAMES:
                problems.append(f"{name} must be one of {OPTIMIZER_NAMES}, got {value!r}")
        if share_moments and (inner_optimizer, outer_optimizer) != ("adamw", "adamw"):
            problems.append(
                "share_moments=True needs inner_optimizer='adamw' and outer_optimizer='adamw' "
                f"(got {inner_optimizer!r}, {outer_optimizer!r}); pass share_moments=False"
            )
        if problems:
            raise ValueError("SharedMomentAdamW: " + "; ".join(problems))
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.inner_optimizer: OptimizerName = inner_optimizer
        self.outer_optimizer: OptimizerName = outer_optimizer
        self.share_moments = share_moments

    # --- state layout -------------------------------------------------------------------------

    def _inner_keys(self) -> tuple[str, str, str]:
        """Keys of the inner AdamW moments in `self.state[p]` (the outer keys when shared)."""
        if self.share_moments:
            return "step", "exp_avg", "exp_avg_sq"
        return "inner_step", "inner_exp_avg", "inner_exp_avg_sq"

    def _moments(self, param: Tensor, keys: tuple[str, str, str]) -> AdamWMoments:
        """The AdamW moments of `param` stored under `keys`, created (zeros, step 0) if absent."""
        state = self.state[param]
        step_key, exp_avg_key, exp_avg_sq_key = keys
        if step_key not in state:
            fresh = new_adamw_moments(param)
            state[step_key] = fresh["step"]
            state[exp_avg_key] = fresh["exp_avg"]
            state[exp_avg_sq_key] = fresh["exp_avg_sq"]
        return AdamWMoments(
            step=state[step_key], exp_avg=state[exp_avg_key], exp_avg_sq=state[exp_avg_sq_key]
        )

    def _groups_of(self, params: Iterable[Tensor]) -> list[dict[str, Any]]:
        """The param group of each tensor; the defaults for a tensor in none (ZeRO-3)."""
        by_id = {id(p): group for group in self.param_groups for p in group["params"]}
        return [by_id.get(id(p), self.defaults) for p in params]

    # --- inner (adaptation) step --------------------------------------------------------------

    def inner_state(self, named_params: Mapping[str, Tensor]) -> dict[str, AdamWMoments] | None:
        """The inner AdamW moments of `named_params` (this optimizer's tensors), keyed by name.

        Live references into `self.state` (created as zeros if absent): the shared moments when
        `share_moments`, the separate inner moments otherwise; None for an SGD inner step. Pass the
        result as `meta_gradient(adam_state=...)`, which leaves it untouched and returns the
        updated moments; write those back with `load_inner_state`.
        """
        if self.inner_optimizer == "sgd":
            return None
        keys = self._inner_keys()
        return {name: self._moments(p, keys) for name, p in named_params.items()}

    @torch.no_grad()
    def load_inner_state(
        self, named_params: Mapping[str, Tensor], state: Mapping[str, AdamWMoments] | None
    ) -> None:
        """Copy inner moments (e.g. `MetaGradient.adam_state`) into this optimizer's state."""
        if state is None:
            return
        for name, live in (self.inner_state(named_params) or {}).items():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                live[key].copy_(state[name][key])

    def inner_kwargs(self, named_params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Keyword arguments of `meta_gradient` that describe this optimizer's inner step.

        `inner_optimizer`, `adam_state`, `betas`, `eps` and a per-name `weight_decay` from the
        param groups; betas and eps must be the same in every group that holds `named_params`.
        """
        groups = self._groups_of(named_params.values())
        hyper = {(tuple(g["betas"]), g["eps"]) for g in groups}
        if len(hyper) > 1:
            raise ValueError(f"inner_kwargs: param groups differ in (betas, eps): {sorted(hyper)}")
        betas, eps = hyper.pop() if hyper else (self.defaults["betas"], self.defaults["eps"])
        return {
            "inner_optimizer": self.inner_optimizer,
            "adam_state": self.inner_state(named_params),
            "betas": betas,
            "eps": eps,
            "weight_decay": {
                name: g["weight_decay"] for name, g in zip(named_params, groups, strict=True)
            },
        }

    @torch.no_grad()
    def inner_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        inner_lr: float,
        adapted: Sequence[Tensor] | None = None,
        out: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """One adaptation step (Algorithm 1, lines 6-9) on the shared (or inner) moments.

        theta_(j+1) = update(theta_j, g_j) with the inner rule and `inner_lr`; the inner moments
        of each tensor are updated in place (one step counted per tensor).

        Args:
            params: this optimizer's tensors (the keys of its state); theta_0 of the task.
            grads: the support gradient g_j, one per tensor of `params`.
            inner_lr: the inner learning rate (alpha).
            adapted: theta_j, the current adapted tensors; defaults to `params` (first step).
            out: buffers to write theta_(j+1) into (may be `adapted` itself); default new tensors.

        Returns:
            theta_(j+1), one tensor per tensor of `params`. `params` itself is never modified
            unless it is passed as `out`.
        """
        adapted = params if adapted is None else adapted
        outs: Sequence[Tensor | None] = [None] * len(params) if out is None else out
        if not len(params) == len(grads) == len(adapted) == len(outs):
            raise ValueError("inner_step: params, grads, adapted and out differ in length")
        keys = self._inner_keys()
        new_params = []
        groups = self._groups_of(params)
        for p, g, theta, buf, group in zip(params, grads, adapted, outs, groups, strict=True):
            if self.inner_optimizer == "sgd":
                new = sgd_update(
                    theta, g, lr=inner_lr, weight_decay=group["weight_decay"], param_out=buf
                )
            else:
                m = self._moments(p, keys)
                new, *_ = adamw_update(
                    theta, g, m["exp_avg"], m["exp_avg_sq"], m["step"],
                    lr=inner_lr, betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], moments_in_place=True, param_out=buf,
                )  # fmt: skip
            new_params.append(new)
        return new_params

    # --- outer (meta) step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Outer update from `p.grad` with the outer rule and the group's lr.

        Unshared inner moments of the updated tensors are dropped afterwards, so the next
        meta-update's inner loop starts from fresh moments.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SharedMomentAdamW does not support sparse gradients")
                if self.outer_optimizer == "sgd":
                    sgd_update(
                        p, p.grad, lr=group["lr"], weight_decay=group["weight_decay"], param_out=p
                    )
                else:
                    m = self._moments(p, ("step", "exp_avg", "exp_avg_sq"))
                    adamw_update(
                        p, p.grad, m["exp_avg"], m["exp_avg_sq"], m["step"],
                        lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"], moments_in_place=True, param_out=p,
                    )  # fmt: skip
                if not self.share_moments:
                    for key in self._inner_keys():
                        self.state[p].pop(key, None)
        return loss
