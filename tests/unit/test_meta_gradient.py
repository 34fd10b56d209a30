"""The meta-gradient (maml_ds.meta.gradient) against references, in float64 on tiny models.

References: autograd through the unrolled loop (`exact`), closed forms on a quadratic, and hand
computations of theta_k. Losses are computed from logits in float64: transformers' `labels=` loss
casts logits to float32, which would put a ~1e-8 floor under every comparison here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

from maml_ds.meta import (
    InnerStepConfig,
    LiveTensorBytes,
    RngSnapshot,
    fd_epsilon,
    finite_difference_hvp,
    inner_precondition,
    inner_step,
    meta_gradient,
    new_adamw_state,
    query_gradient,
    reverse_step,
    support_gradient,
)

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[Tensors, Any], torch.Tensor]
DT = torch.float64
ALL_MODES = ("exact", "hvp", "hvp-fd", "first-order")


# --- models -----------------------------------------------------------------------------------


def mlp_params(seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(8, 4, generator=g, dtype=DT) * 0.7,
        "b1": torch.randn(8, generator=g, dtype=DT) * 0.1,
        "w2": torch.randn(3, 8, generator=g, dtype=DT) * 0.5,
        "b2": torch.zeros(3, dtype=DT),
    }


def mlp_loss(params: Tensors, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch  # (n, 4), (n,)
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return F.cross_entropy(hidden @ params["w2"].T + params["b2"], y)


def mlp_batches(num: int, seed: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 4, generator=g, dtype=DT), torch.randint(0, 3, (size,), generator=g))
        for _ in range(num)
    ]


def tiny_gpt2(attn: str = "eager", *, train: bool = False) -> GPT2LMHeadModel:
    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(DT).train(train)


def gpt2_loss_fn(model: GPT2LMHeadModel) -> LossFn:
    def loss_fn(params: Tensors, ids: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (ids,)).logits  # (b, t, vocab), float64
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return loss_fn


def gpt2_batches(num: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 12), generator=g) for _ in range(num)]


def gpt2_setup(**kwargs: Any) -> tuple[LossFn, Tensors]:
    model = tiny_gpt2(**kwargs)
    return gpt2_loss_fn(model), {n: p.detach() for n, p in model.named_parameters()}


def mlp_setup() -> tuple[LossFn, Tensors]:
    return mlp_loss, mlp_params()


SETUPS = {"mlp": (mlp_setup, mlp_batches), "gpt2": (gpt2_setup, gpt2_batches)}
# Inner learning rates where the second-order term is a large part of the meta-gradient.
INNER_LR = {
    ("mlp", "sgd"): 0.5,
    ("mlp", "adamw"): 0.5,
    ("gpt2", "sgd"): 0.5,
    ("gpt2", "adamw"): 0.02,
}


def warm_state(params: Tensors, seed: int = 3) -> dict:
    """AdamW moments as a previous meta-update could leave them (step 5, positive v)."""
    g = torch.Generator().manual_seed(seed)
    state = new_adamw_state(params)
    for s in state.values():
        s["step"].fill_(5.0)
        s["exp_avg"].copy_(torch.randn(s["exp_avg"].shape, generator=g, dtype=DT) * 1e-2)
        s["exp_avg_sq"].copy_(torch.rand(s["exp_avg_sq"].shape, generator=g, dtype=DT) * 1e-3)
    return state


def rel_diff(a: Tensors, b: Tensors) -> float:
    assert a.keys() == b.keys()
    num = sum(float(((a[n] - b[n]) ** 2).sum()) for n in a)
    return math.sqrt(num / sum(float((b[n] ** 2).sum()) for n in b))


def plain_gradient(loss_fn: LossFn, params: Tensors, batches: list) -> Tensors:
    """Gradient of the mean loss over `batches`, by hand."""
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    loss = torch.stack([loss_fn(leaves, b) for b in batches]).mean()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


# --- exact vs hvp vs hvp-fd -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_hvp_matches_exact_and_second_order_term_is_large(model: str, inner: str, k: int) -> None:
    setup, batches = SETUPS[model]
    loss_fn, params = setup()
    kwargs: dict[str, Any] = {"inner_lr": INNER_LR[model, inner], "inner_optimizer": inner}
    kwargs["weight_decay"] = 0.1
    if inner == "adamw":
        kwargs["adam_state"] = warm_state(params)
    support, query = batches(k, seed=1), batches(k, seed=2)
    result = {
        mode: meta_gradient(loss_fn, params, support, query, second_order=mode, **kwargs)
        for mode in ALL_MODES
    }
    exact = result["exact"].grads
    assert rel_diff(result["hvp"].grads, exact) < 1e-10
    # A silently first-order implementation would fail the comparison above by > 10 %.
    assert rel_diff(result["first-order"].grads, exact) > 0.1
    # Losses and the moments handed back are the same quantities in every mode.
    for mode in ALL_MODES:
        torch.testing.assert_close(result[mode].support_loss, result["exact"].support_loss)
        torch.testing.assert_close(result[mode].query_loss, result["exact"].query_loss)
        if inner == "adamw":
            for name, s in result[mode].adam_state.items():
                assert s["step"].item() == 5 + k
                torch.testing.assert_close(
                    s["exp_avg_sq"], result["exact"].adam_state[name]["exp_avg_sq"]
                )
        else:
            assert result[mode].adam_state is None
    # One-sided FD (the default) at its default step, float64.
    assert rel_diff(result["hvp-fd"].grads, exact) < 1e-5


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_central_fd_matches_exact_float64(inner: str) -> None:
    loss_fn, params = gpt2_setup()
    support, query = gpt2_batches(2, seed=1), gpt2_batches(2, seed=2)
    kwargs: dict[str, Any] = {"inner_lr": INNER_LR["gpt2", inner], "inner_optimizer": inner}
    exact = meta_gradient(loss_fn, params, support, query, **kwargs).grads
    central = meta_gradient(
        loss_fn, params, support, query, second_order="hvp-fd", fd_mode="central", **kwargs
    ).grads
    assert rel_diff(central, exact) < 1e-5


def test_fd_float32_error_as_documented() -> None:
    """float32 hvp-fd vs float64 exact, default r: 3.5e-5 (central), 7.4e-4 (one-sided) here;
    docs/meta-gradient.md has the sweep. float32 exact itself is 2.8e-7 off."""
    loss_fn64, params64 = gpt2_setup()
    support, query = gpt2_batches(1, seed=1), gpt2_batches(1, seed=2)
    reference = meta_gradient(loss_fn64, params64, support, query, inner_lr=1.0).grads
    model32 = tiny_gpt2().float()
    params32 = {n: p.float() for n, p in params64.items()}
    loss_fn32 = gpt2_loss_fn(model32)
    for fd_mode, bound in (("central", 2e-4), ("one-sided", 4e-3)):
        grads = meta_gradient(
            loss_fn32, params32, support, query, inner_lr=1.0, second_order="hvp-fd",
            fd_mode=fd_mode,
        ).grads  # fmt: skip
        assert grads["transformer.h.0.attn.c_attn.weight"].dtype == torch.float32
        assert rel_diff({n: g.double() for n, g in grads.items()}, reference) < bound


def test_dropout_masks_are_replayed() -> None:
    """With dropout on, hvp / hvp-fd re-evaluate support losses with the first pass's masks."""
    loss_fn, params = gpt2_setup(train=True)
    support, query = gpt2_batches(3, seed=1), gpt2_batches(3, seed=2)
    grads, after = {}, {}
    for mode, fd_mode in (("exact", "central"), ("hvp", "central"), ("hvp-fd", "central")):
        torch.manual_seed(7)
        grads[mode] = meta_gradient(
            loss_fn, params, support, query, inner_lr=1.0, second_order=mode, fd_mode=fd_mode
        ).grads
        after[mode] = torch.rand(4)  # the RNG stream continues the same way in every mode
    assert rel_diff(grads["hvp"], grads["exact"]) < 1e-10
    assert rel_diff(grads["hvp-fd"], grads["exact"]) < 1e-5
    assert torch.equal(after["hvp"], after["exact"]) and torch.equal(
        after["hvp-fd"], after["exact"]
    )
    torch.manual_seed(8)  # other masks: a different quantity, so the check above is not vacuous
    other = meta_gradient(loss_fn, params, support, query, inner_lr=1.0).grads
    assert rel_diff(other, grads["exact"]) > 1e-3


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_zero_inner_lr_gives_the_query_gradient(inner: str) -> None:
    loss_fn, params = gpt2_setup()
    support, query = gpt2_batches(2, seed=1), gpt2_batches(2, seed=2)
    expected = plain_gradient(loss_fn, params, query)
    for mode in ALL_MODES:
        got = meta_gradient(
            loss_fn, params, support, query, inner_lr=0.0, inner_optimizer=inner,
            second_order=mode, weight_decay=0.1,
        ).grads  # fmt: skip
        assert rel_diff(got, expected) < 1e-13, mode


def test_no_support_batches_gives_the_query_gradient() -> None:
    params, query = mlp_params(), mlp_batches(2, seed=2)
    expected = plain_gradient(mlp_loss, params, query)
    for mode in ALL_MODES:
        result = meta_gradient(mlp_loss, params, [], query, inner_lr=1.0, second_order=mode)
        assert rel_diff(result.grads, expected) < 1e-13
        assert math.isnan(result.support_loss.item())


def hand_adapted(
    params: Tensors, support: list, inner: str, lr: float, wd: float, betas=(0.9, 0.999), eps=1e-8
) -> Tensors:
    """theta_k by hand (plain formulas, fresh AdamW moments)."""
    theta = {n: p.clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t, batch in enumerate(support, start=1):
        g = plain_gradient(mlp_loss, theta, [batch])
        for n in theta:
            if inner == "sgd":
                theta[n] = theta[n] * (1 - lr * wd) - lr * g[n]
                continue
            m[n] = betas[0] * m[n] + (1 - betas[0]) * g[n]
            v[n] = betas[1] * v[n] + (1 - betas[1]) * g[n] ** 2
            m_hat, v_hat = m[n] / (1 - betas[0] ** t), v[n] / (1 - betas[1] ** t)
            theta[n] = theta[n] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    return theta


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_first_order_is_the_query_gradient_at_the_adapted_params(inner: str) -> None:
    params = mlp_params()
    support, query = mlp_batches(3, seed=1), mlp_batches(3, seed=2)
    lr = INNER_LR["mlp", inner]
    expected = plain_gradient(mlp_loss, hand_adapted(params, support, inner, lr, 0.1), query)
    result = meta_gradient(
        mlp_loss, params, support, query, inner_lr=lr, inner_optimizer=inner,
        second_order="first-order", weight_decay=0.1,
    )  # fmt: skip
    assert rel_diff(result.grads, expected) < 1e-12
    support_losses = []
    theta = params
    for j, batch in enumerate(support):  # support_loss = mean of the losses at theta_0..theta_(k-1)
        support_losses.append(mlp_loss(theta, batch))
        theta = hand_adapted(params, support[: j + 1], inner, lr, 0.1)
    torch.testing.assert_close(result.support_loss, torch.stack(support_losses).mean())
    expected_query = torch.stack([mlp_loss(theta, b) for b in query]).mean()
    torch.testing.assert_close(result.query_loss, expected_query)


def quadratic_loss(params: Tensors, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """0.5 z^T A z - c^T z with z = (x, flattened y): gradient A z - c, Hessian A."""
    a, c = batch
    z = torch.cat([params["x"], params["y"].flatten()])
    return 0.5 * z @ a @ z - c @ z


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_quadratic_closed_form(inner: str) -> None:
    g = torch.Generator().manual_seed(0)
    dim, k, lr, wd, betas, eps = 9, 3, 0.2, 0.1, (0.9, 0.999), 1e-8
    if inner == "adamw":
        lr = 0.05

    def spd() -> torch.Tensor:
        q = torch.randn(dim, dim, generator=g, dtype=DT)
        return q @ q.T / dim + 0.1 * torch.eye(dim, dtype=DT)

    support = [(spd(), torch.randn(dim, generator=g, dtype=DT)) for _ in range(k)]
    query = [(spd(), torch.randn(dim, generator=g, dtype=DT)) for _ in range(k)]
    params = {
        "x": torch.randn(5, generator=g, dtype=DT),
        "y": torch.randn(2, 2, generator=g, dtype=DT),
    }

    # Closed form: z_(j+1) = (1 - lr wd) z_j - lr D_j (A_j z_j - c_j),
    # J_j = (1 - lr wd) I - lr D_j A_j,
    # meta-gradient = J_0^T ... J_(k-1)^T (mean_i (C_i z_k - d_i)).
    z = torch.cat([params["x"], params["y"].flatten()])
    m, v = torch.zeros(dim, dtype=DT), torch.zeros(dim, dtype=DT)
    jacobians = []
    for t, (a, c) in enumerate(support, start=1):
        grad = a @ z - c
        if inner == "sgd":
            d, direction = torch.ones(dim, dtype=DT), grad
        else:
            m = betas[0] * m + (1 - betas[0]) * grad
            v = betas[1] * v + (1 - betas[1]) * grad**2
            denom = (v / (1 - betas[1] ** t)).sqrt() + eps
            d = (1 - betas[0]) / ((1 - betas[0] ** t) * denom)
            direction = m / (1 - betas[0] ** t) / denom
        jacobians.append((1 - lr * wd) * torch.eye(dim, dtype=DT) - lr * torch.diag(d) @ a)
        z = (1 - lr * wd) * z - lr * direction
    u = torch.stack([cq @ z - dq for cq, dq in query]).mean(0)
    for jac in reversed(jacobians):
        u = jac.T @ u
    expected = {"x": u[:5], "y": u[5:].reshape(2, 2)}

    for mode, fd_mode in [*((m_, "one-sided") for m_ in ALL_MODES), ("hvp-fd", "central")]:
        got = meta_gradient(
            quadratic_loss, params, support, query, inner_lr=lr, inner_optimizer=inner,
            second_order=mode, weight_decay=wd, fd_mode=fd_mode, fd_scale=1e-2,
        ).grads  # fmt: skip
        tolerance = 1e-10 if mode != "first-order" else None
        if tolerance is None:  # first-order misses the (here large) second-order term
            assert rel_diff(got, expected) > 0.1
        else:
            assert rel_diff(got, expected) < tolerance, (mode, fd_mode)


def test_inputs_are_not_modified() -> None:
    loss_fn, params = gpt2_setup()
    state = warm_state(params)
    params_before = {n: p.clone() for n, p in params.items()}
    state_before = {n: {k: t.clone() for k, t in s.items()} for n, s in state.items()}
    support, query = gpt2_batches(2, seed=1), gpt2_batches(1, seed=2)
    for mode in ALL_MODES:
        result = meta_gradient(
            loss_fn, params, support, query, inner_lr=1e-3, inner_optimizer="adamw",
            second_order=mode, adam_state=state,
        )  # fmt: skip
        assert result.grads.keys() == params.keys()
        assert all(result.grads[n].shape == p.shape for n, p in params.items())
    for n, p in params.items():
        assert torch.equal(p, params_before[n])
        assert all(torch.equal(t, state_before[n][k]) for k, t in state[n].items())


def test_invalid_arguments_are_reported_together() -> None:
    params, batches = mlp_params(), mlp_batches(1, seed=0)
    with pytest.raises(ValueError) as err:
        meta_gradient(
            mlp_loss,
            params,
            batches,
            [],
            inner_lr=0.1,
            second_order="second",  # type: ignore[arg-type]
            fd_mode="forward",  # type: ignore[arg-type]
        )
    message = str(err.value)
    assert "second_order" in message and "fd_mode" in message and "query" in message
    with pytest.raises(ValueError, match="inner_optimizer"):
        meta_gradient(mlp_loss, params, batches, batches, inner_lr=0.1, inner_optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inner_lr"):
        meta_gradient(mlp_loss, params, batches, batches, inner_lr=-1.0)


# --- attention kernels ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "hvp"])
def test_sdpa_model_works_in_double_backward_modes(mode: str) -> None:
    """Default SDPA (a flash kernel on CPU) has no double backward; meta_gradient forces math."""
    loss_fn, params = gpt2_setup(attn="sdpa")
    support, query = gpt2_batches(2, seed=1), gpt2_batches(2, seed=2)
    got = meta_gradient(loss_fn, params, support, query, inner_lr=1.0, second_order=mode).grads
    eager_loss_fn, _ = gpt2_setup(attn="eager")
    expected = meta_gradient(eager_loss_fn, params, support, query, inner_lr=1.0).grads
    assert rel_diff(got, expected) < 1e-10


def test_missing_double_backward_fails_with_a_clear_message() -> None:
    model = tiny_gpt2(attn="sdpa")
    base_loss = gpt2_loss_fn(model)

    def flash_loss(params: Tensors, ids: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # overrides the math kernel
            return base_loss(params, ids)

    params = {n: p.detach() for n, p in model.named_parameters()}
    batches = gpt2_batches(1, seed=1)
    for mode in ("exact", "hvp"):
        with pytest.raises(RuntimeError, match="hvp-fd"):
            meta_gradient(flash_loss, params, batches, batches, inner_lr=1.0, second_order=mode)
    # Ordinary passes only: works with the flash kernel.
    fd = meta_gradient(flash_loss, params, batches, batches, inner_lr=1.0, second_order="hvp-fd")
    exact = meta_gradient(base_loss, params, batches, batches, inner_lr=1.0).grads
    assert rel_diff(fd.grads, exact) < 1e-5


# --- memory -----------------------------------------------------------------------------------


def peak_bytes(mode: str, k: int) -> int:
    loss_fn, params = gpt2_setup()
    support, query = gpt2_batches(k, seed=1), gpt2_batches(k, seed=2)
    with LiveTensorBytes() as mem:
        result = meta_gradient(
            loss_fn, params, support, query, inner_lr=1e-3, inner_optimizer="adamw",
            second_order=mode,
        )  # fmt: skip
        del result
    return mem.peak_bytes


def test_memory_of_recursive_modes_does_not_grow_with_k() -> None:
    param_bytes = sum(p.numel() * 8 for p in tiny_gpt2().parameters())
    peaks = {
        (mode, k): peak_bytes(mode, k) for mode in ("exact", "hvp", "hvp-fd") for k in (1, 3, 6)
    }
    # exact: the unrolled graph holds more than one parameter copy per inner step.
    assert peaks["exact", 6] - peaks["exact", 3] > 3 * param_bytes
    for mode in ("hvp", "hvp-fd"):
        assert peaks[mode, 6] <= 1.01 * peaks[mode, 3], mode  # flat in k
        # From k = 3 on, the replay holds a working copy of theta_j and its two AdamW moments,
        # which k = 1 (theta_j = theta_0) does not need: 3 parameter copies, no more.
        assert peaks[mode, 6] - peaks[mode, 1] <= 3.05 * param_bytes, mode
        assert peaks[mode, 6] < peaks["exact", 6] / 2


# --- building blocks --------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_building_blocks_reproduce_meta_gradient(inner: str) -> None:
    """The reverse recursion written out with the public building blocks (as the engine would)."""
    loss_fn, params = mlp_setup()
    support, query = mlp_batches(2, seed=1), mlp_batches(2, seed=2)
    config = InnerStepConfig(lr=INNER_LR["mlp", inner], optimizer=inner, weight_decay=0.05)
    state0 = new_adamw_state(params) if inner == "adamw" else None

    # Forward: theta_0 -> theta_1 -> theta_2, keeping the (few) points by hand here.
    thetas, states, rngs = [params], [state0], []
    for batch in support:
        rngs.append(RngSnapshot.capture())
        grads = support_gradient(loss_fn, thetas[-1], batch).grads
        theta, state = inner_step(thetas[-1], grads, config, states[-1])
        thetas.append(theta)
        states.append(state)
    _, u_exact = query_gradient(loss_fn, thetas[-1], query)
    u_fd = dict(u_exact)
    for j in reversed(range(len(support))):
        sg = support_gradient(loss_fn, thetas[j], support[j], create_graph=True, rng=rngs[j])
        precond = inner_precondition(states[j + 1], config)
        u_exact = reverse_step(u_exact, sg.hvp, precond, config)  # type: ignore[arg-type]

        def grad_fn(p: Tensors, batch: Any = support[j]) -> Tensors:
            return support_gradient(loss_fn, p, batch).grads

        def fd_hvp(w: Tensors, j: int = j, g_j: Tensors = sg.grads) -> Tensors:
            norm = lambda ts: math.sqrt(sum(float((t**2).sum()) for t in ts.values()))  # noqa: E731
            eps = fd_epsilon(norm(thetas[j]), norm(w), 1e-6)
            return finite_difference_hvp(grad_fn, thetas[j], w, eps=eps, fd_mode="central")

        u_fd = reverse_step(u_fd, fd_hvp, precond, config)

    kwargs = {"inner_lr": config.lr, "inner_optimizer": inner, "weight_decay": 0.05}
    expected = meta_gradient(loss_fn, params, support, query, **kwargs).grads
    assert rel_diff(u_exact, expected) < 1e-12
    assert rel_diff(u_fd, expected) < 1e-6


def test_inner_step_matches_sgd_and_adamw_formulas_on_flat_partitions() -> None:
    """Elementwise: a flat concatenation steps exactly like the separate tensors."""
    params = mlp_params()
    grads = plain_gradient(mlp_loss, params, mlp_batches(1, seed=5))
    for optimizer in ("sgd", "adamw"):
        config = InnerStepConfig(lr=0.1, optimizer=optimizer, weight_decay=0.01)
        state = warm_state(params) if optimizer == "adamw" else None
        new, new_state = inner_step(params, grads, config, state)
        flat = {"flat": torch.cat([p.flatten() for p in params.values()])}
        flat_grads = {"flat": torch.cat([g.flatten() for g in grads.values()])}
        flat_state = None
        if state is not None:
            flat_state = {
                "flat": {
                    "step": torch.tensor(5.0),
                    "exp_avg": torch.cat([s["exp_avg"].flatten() for s in state.values()]),
                    "exp_avg_sq": torch.cat([s["exp_avg_sq"].flatten() for s in state.values()]),
                }
            }
        flat_new, flat_new_state = inner_step(flat, flat_grads, config, flat_state)  # type: ignore[arg-type]
        assert torch.equal(flat_new["flat"], torch.cat([p.flatten() for p in new.values()]))
        if new_state is not None:
            assert flat_new_state is not None
            assert torch.equal(
                flat_new_state["flat"]["exp_avg_sq"],
                torch.cat([s["exp_avg_sq"].flatten() for s in new_state.values()]),
            )


# --- the engine's memory options and the 16-bit rounding check --------------------------------


@pytest.mark.parametrize("mode", ["hvp-fd", "hvp", "first-order"])
@pytest.mark.parametrize("k", [1, 3])
def test_moments_in_place_and_kept_gradients_change_nothing(mode: str, k: int) -> None:
    """The sharded path's options are bit-equal to the default: the caller's moments end as the
    returned state (same tensors), and keeping every support gradient gives the same result."""
    loss_fn, params = mlp_setup()
    support, query = mlp_batches(k, seed=1), mlp_batches(k, seed=2)
    kwargs: dict[str, Any] = {"inner_lr": 0.5, "inner_optimizer": "adamw", "second_order": mode}
    reference = meta_gradient(
        loss_fn, params, support, query, adam_state=warm_state(params), **kwargs
    )
    live = warm_state(params)
    result = meta_gradient(
        loss_fn, params, support, query, adam_state=live, moments_in_place=True,
        keep_support_gradients=k - 1, **kwargs,
    )  # fmt: skip
    for name in params:
        assert torch.equal(result.grads[name], reference.grads[name]), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            returned = result.adam_state[name][key]
            assert returned.data_ptr() == live[name][key].data_ptr()  # the same storage
            assert torch.equal(live[name][key], reference.adam_state[name][key])


def test_inner_update_kept_measures_what_a_16_bit_forward_sees() -> None:
    from maml_ds.meta import inner_update_kept

    theta = {"w": torch.linspace(1.0, 2.0, 1000)}  # bf16 spacing 2^-7 .. 2^-6 here
    lost = inner_update_kept(theta, {"w": theta["w"] + 1e-4}, torch.bfloat16)
    assert lost.intended == 1000 and lost.share_kept < 0.05
    kept = inner_update_kept(theta, {"w": theta["w"] + 0.1}, torch.bfloat16)
    assert kept.share_kept == 1.0 and kept.cosine > 0.999
    assert inner_update_kept(theta, theta, torch.bfloat16).share_kept == 1.0  # no step


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_kept_support_gradients_through_a_store(optimizer: str) -> None:
    """hvp-fd, k = 4: keeping c = 0 .. 3 support gradients, stored by a `keep_fn` that copies
    them (as a host store does), gives bit-equal meta-gradients; c = k - 1 runs 3k passes (no
    support pass in any replay) and asks for each kept gradient once per use."""
    loss_fn, params = mlp_setup()
    k = 4
    support, query = mlp_batches(k, seed=1), mlp_batches(k, seed=2)
    kwargs: dict[str, Any] = {
        "inner_lr": 0.5 if optimizer == "sgd" else 0.05, "inner_optimizer": optimizer,
        "second_order": "hvp-fd",
    }  # fmt: skip
    if optimizer == "adamw":
        kwargs["adam_state"] = warm_state(params)
    reference = meta_gradient(loss_fn, params, support, query, **kwargs)
    for c in range(k):
        stored: list[dict] = []
        loaded: list[int] = []
        passes: list[int] = []

        def keep_fn(grads, stored=stored, loaded=loaded):
            copy = {name: g.clone() for name, g in grads.items()}
            stored.append(copy)

            def load():
                loaded.append(1)
                return {name: g.clone() for name, g in copy.items()}

            return load

        def counted(p, batch, passes=passes):
            passes.append(1)
            return loss_fn(p, batch)

        result = meta_gradient(
            counted, params, support, query, keep_support_gradients=c, keep_fn=keep_fn, **kwargs
        )
        for name in params:
            assert torch.equal(result.grads[name], reference.grads[name]), (c, name)
        assert len(stored) == c
        # each replay j (< k - 1) loads the kept ones before it; each kept one its reverse step
        assert len(loaded) == sum(min(j, c) for j in range(k - 1)) + c
        if c == k - 1:
            assert len(passes) == 3 * k
