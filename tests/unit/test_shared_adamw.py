"""SharedMomentAdamW: torch AdamW parity, Algorithm 1's shared moments, ablations, state_dict."""

from __future__ import annotations

import io

import pytest
import torch

from maml_ds.meta import SharedMomentAdamW, meta_gradient

SHAPES = [(7,), (3, 5), (2, 3, 4), (100,)]  # (100,): a flat ZeRO-1/2 partition


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def random_like(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0},
    ]


def assert_same_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    for p, q in zip(ours.state, theirs.state, strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key]), key


def test_outer_step_is_bit_equal_to_torch_adamw() -> None:
    ours_params, torch_params = make_params(), make_params()
    hyper = {"betas": (0.8, 0.99), "eps": 1e-6}
    ours = SharedMomentAdamW(groups(ours_params), **hyper)
    reference = torch.optim.AdamW(groups(torch_params), foreach=False, amsgrad=False, **hyper)
    for step in range(6):
        grads = random_like(ours_params, step)
        for i, (p, q, g) in enumerate(zip(ours_params, torch_params, grads, strict=True)):
            # Tensor 1 skips every other step: step counts and bias corrections are per tensor.
            p.grad = q.grad = None if (i == 1 and step % 2) else g.clone()
        ours.step()
        reference.step()
        for p, q in zip(ours_params, torch_params, strict=True):
            assert torch.equal(p, q)
        assert_same_state(ours, reference)
    assert ours.state[ours_params[1]]["step"].item() == 3
    assert ours.state[ours_params[0]]["step"].item() == 6


def algorithm1_reference(
    params: list[torch.Tensor],
    inner_grads: list[list[list[torch.Tensor]]],
    outer_grads: list[list[torch.Tensor]],
    *,
    lr: float,
    inner_lr: float,
    betas: tuple[float, float],
    eps: float,
    wd: float,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Algorithm 1's updates of ONE moment pair, written out (inner steps, then the outer step).

    Returns the adapted tensors after each inner step, the final params, m and v.
    """
    b1, b2 = betas
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    t = 0
    adapted_all = []

    def update(x: torch.Tensor, i: int, g: torch.Tensor, rate: float) -> torch.Tensor:
        m[i] = b1 * m[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
        return x * (1 - rate * wd) - rate * m_hat / (v_hat.sqrt() + eps)

    for task_grads, g_outer in zip(inner_grads, outer_grads, strict=True):
        adapted = list(theta)
        for g_inner in task_grads:  # lines 6-9: support gradients update the shared m, v
            t += 1
            adapted = [update(adapted[i], i, g, inner_lr) for i, g in enumerate(g_inner)]
            adapted_all.append(adapted)
        t += 1  # lines 13-16: the meta-gradient updates the same m, v
        theta = [update(theta[i], i, g, lr) for i, g in enumerate(g_outer)]
    return adapted_all, theta, m, v


@pytest.mark.parametrize("num_inner", [1, 2])
def test_shared_moments_follow_algorithm_1(num_inner: int) -> None:
    params = make_params(torch.float64)
    initial = [p.detach().clone() for p in params]
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}
    opt = SharedMomentAdamW(params, **hyper)
    inner_grads = [[random_like(params, 100 * u + j) for j in range(num_inner)] for u in range(3)]
    outer_grads = [random_like(params, 1000 + u) for u in range(3)]
    adapted_seen = []
    for task_grads, g_outer in zip(inner_grads, outer_grads, strict=True):
        adapted = None
        for g_inner in task_grads:
            adapted = opt.inner_step(params, g_inner, inner_lr=0.3, adapted=adapted)
            adapted_seen.append(adapted)
        for p, g in zip(params, g_outer, strict=True):
            p.grad = g
        opt.step()
    exp_adapted, exp_params, exp_m, exp_v = algorithm1_reference(
        initial, inner_grads, outer_grads, lr=1e-2, inner_lr=0.3, betas=(0.9, 0.99), eps=1e-8,
        wd=0.05,
    )  # fmt: skip
    close = {"rtol": 1e-12, "atol": 1e-14}
    for got, expected in zip(adapted_seen, exp_adapted, strict=True):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **close)
    # `params` themselves were only changed by the outer steps:
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), exp_params[i], **close)
        torch.testing.assert_close(opt.state[p]["exp_avg"], exp_m[i], **close)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], exp_v[i], **close)
        assert opt.state[p]["step"].item() == 3 * (num_inner + 1)
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_unshared_inner_state_is_fresh_and_outer_state_persists() -> None:
    params, torch_params = make_params(), make_params()
    opt = SharedMomentAdamW(groups(params), share_moments=False)
    reference = torch.optim.AdamW(groups(torch_params), foreach=False)
    for update in range(3):
        g_inner = random_like(params, 10 + update)
        adapted = opt.inner_step(params, g_inner, inner_lr=0.1)
        # Fresh moments at each meta-update: the first inner step is AdamW's step 1,
        # m_hat = g, v_hat = g^2.
        for p, a, g, wd in zip(params, adapted, g_inner, (0.1, 0.1, 0.0, 0.0), strict=True):
            expected = p.detach() * (1 - 0.1 * wd) - 0.1 * g / (g.abs() + 1e-8)
            torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
            assert opt.state[p]["inner_step"].item() == 1
        opt.inner_step(params, random_like(params, 20 + update), inner_lr=0.1, adapted=adapted)
        assert opt.state[params[0]]["inner_step"].item() == 2
        for p, q, g in zip(params, torch_params, random_like(params, 30 + update), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        # The outer state is torch AdamW's, untouched by the inner steps; the inner one is gone.
        for p, q in zip(params, torch_params, strict=True):
            assert torch.equal(p, q)
            assert "inner_step" not in opt.state[p]
        assert_same_state(opt, reference)


def test_sgd_ablations() -> None:
    # inner SGD, outer AdamW: stateless inner step, outer state is plain AdamW's.
    params, torch_params = make_params(), make_params()
    opt = SharedMomentAdamW(groups(params), inner_optimizer="sgd", share_moments=False)
    reference = torch.optim.AdamW(groups(torch_params), foreach=False)
    grads = random_like(params, 1)
    adapted = opt.inner_step(params, grads, inner_lr=0.5)
    for p, a, g, wd in zip(params, adapted, grads, (0.1, 0.1, 0.0, 0.0), strict=True):
        torch.testing.assert_close(a, p.detach() * (1 - 0.5 * wd) - 0.5 * g)
    assert len(opt.state) == 0
    for p, q, g in zip(params, torch_params, random_like(params, 2), strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, torch_params, strict=True))

    # inner AdamW (fresh each meta-update), outer SGD: no outer moments at all.
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = SharedMomentAdamW(groups(params), outer_optimizer="sgd", share_moments=False)
    opt.inner_step(params, random_like(params, 3), inner_lr=0.1)
    assert all(
        set(opt.state[p]) == {"inner_step", "inner_exp_avg", "inner_exp_avg_sq"} for p in params
    )
    grads = random_like(params, 4)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    lrs, decays = (1e-2, 1e-2, 3e-3, 3e-3), (0.1, 0.1, 0, 0)
    for p, b, g, lr, wd in zip(params, before, grads, lrs, decays, strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - lr * wd) - lr * g)
        assert len(opt.state[p]) == 0

    # SGD + SGD: no state anywhere.
    params = make_params()
    opt = SharedMomentAdamW(
        params, inner_optimizer="sgd", outer_optimizer="sgd", share_moments=False
    )
    opt.inner_step(params, random_like(params, 5), inner_lr=0.1)
    for p, g in zip(params, random_like(params, 6), strict=True):
        p.grad = g
    opt.step()
    assert all(len(s) == 0 for s in opt.state.values())
    assert opt.inner_state({"p": params[0]}) is None


def test_invalid_configurations_are_reported_together() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="share_moments"):
        SharedMomentAdamW(params, inner_optimizer="sgd")
    with pytest.raises(ValueError) as err:
        SharedMomentAdamW(params, lr=-1.0, outer_optimizer="adam", share_moments=False)  # type: ignore[arg-type]
    assert "lr" in str(err.value) and "outer_optimizer" in str(err.value)


@pytest.mark.parametrize("share_moments", [True, False])
def test_state_dict_round_trip_is_exact(share_moments: bool) -> None:
    def meta_update(opt: SharedMomentAdamW, params: list[torch.Tensor], seed: int) -> list:
        adapted = opt.inner_step(params, random_like(params, seed), inner_lr=0.1)
        for p, g in zip(params, random_like(params, seed + 1), strict=True):
            p.grad = g
        opt.step()
        return adapted

    params = make_params()
    opt = SharedMomentAdamW(groups(params), share_moments=share_moments)
    for u in range(3):
        meta_update(opt, params, 10 * u)
    opt.inner_step(params, random_like(params, 99), inner_lr=0.1)  # mid meta-update
    buffer = io.BytesIO()  # a checkpoint: state_dict() holds references to the live tensors
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = SharedMomentAdamW(groups(params2), share_moments=share_moments)
    opt2.load_state_dict(saved)
    for p, q in zip(params, params2, strict=True):
        assert opt.state[p].keys() == opt2.state[q].keys()
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])
    for u in range(3, 5):
        a1, a2 = meta_update(opt, params, 10 * u), meta_update(opt2, params2, 10 * u)
        assert all(torch.equal(x, y) for x, y in zip(a1, a2, strict=True))
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])


def test_meta_gradient_uses_the_same_inner_step_and_moments() -> None:
    """meta_gradient(adam_state=opt.inner_state(...)) and opt.inner_step are one implementation."""
    params = {
        "w": torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        "b": torch.zeros(4, dtype=torch.float64),
    }
    named = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = SharedMomentAdamW(
        [
            {"params": [named["w"]], "weight_decay": 0.1},
            {"params": [named["b"]], "weight_decay": 0.0},
        ]
    )
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss_fn(p: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        return torch.tanh(batch @ p["w"].T + p["b"]).pow(2).mean()

    live_before = {
        n: {k: t.clone() for k, t in s.items()} for n, s in opt.inner_state(named).items()
    }
    kwargs = opt.inner_kwargs(named)
    assert kwargs["weight_decay"] == {"w": 0.1, "b": 0.0}
    result = meta_gradient(
        loss_fn, named, [x], [x], inner_lr=0.05, second_order="first-order", **kwargs
    )
    # meta_gradient left the optimizer's live state alone ...
    for n, s in opt.inner_state(named).items():
        assert all(torch.equal(t, live_before[n][k]) for k, t in s.items())
    # ... and its returned moments are what the optimizer's own inner step produces.
    leaves = {n: p.detach().requires_grad_() for n, p in named.items()}
    grads = torch.autograd.grad(loss_fn(leaves, x), list(leaves.values()))
    opt.inner_step(list(named.values()), list(grads), inner_lr=0.05)
    for n, p in named.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], result.adam_state[n][key])
    # load_inner_state writes returned moments into another optimizer's shared state.
    named2 = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt2 = SharedMomentAdamW(list(named2.values()))
    opt2.load_inner_state(named2, result.adam_state)
    for n, p in named2.items():
        assert torch.equal(opt2.state[p]["exp_avg"], result.adam_state[n]["exp_avg"])
        assert opt2.state[p]["step"].item() == 1


def test_flat_partition_equals_separate_tensors_and_zero3_fallback() -> None:
    """ZeRO-1/2 hand one flat partition: every update is elementwise, so results concatenate."""
    params = make_params()
    flat = torch.cat([p.detach().flatten() for p in params]).requires_grad_()
    opt_sep = SharedMomentAdamW(params, weight_decay=0.1)
    opt_flat = SharedMomentAdamW([flat], weight_decay=0.1)
    for u in range(3):
        g_in, g_out = random_like(params, u), random_like(params, 10 + u)
        a_sep = opt_sep.inner_step(params, g_in, inner_lr=0.1)
        (a_flat,) = opt_flat.inner_step(
            [flat], [torch.cat([g.flatten() for g in g_in])], inner_lr=0.1
        )
        assert torch.equal(a_flat, torch.cat([a.flatten() for a in a_sep]))
        for p, g in zip(params, g_out, strict=True):
            p.grad = g
        flat.grad = torch.cat([g.flatten() for g in g_out])
        opt_sep.step()
        opt_flat.step()
        assert torch.equal(flat, torch.cat([p.detach().flatten() for p in params]))
    # ZeRO-3: param_groups are empty outside step(); inner_step falls back to the defaults.
    outside = flat.detach().clone().requires_grad_()
    opt_outside = SharedMomentAdamW([outside], weight_decay=0.1)
    opt_outside.state[outside].update({k: t.clone() for k, t in opt_flat.state[flat].items()})
    opt_outside.param_groups[0]["params"] = []
    grad = random_like([flat], 7)[0]
    expected = opt_flat.inner_step([flat], [grad], inner_lr=0.1)[0]
    got = opt_outside.inner_step([outside], [grad], inner_lr=0.1)[0]
    assert torch.equal(got, expected)
    assert torch.equal(opt_outside.state[outside]["exp_avg_sq"], opt_flat.state[flat]["exp_avg_sq"])
