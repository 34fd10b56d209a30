"""stochastic_round: results are one of x's two representable neighbours, unbiased (E = x),
deterministic per generator state; the straight-through wrapper has an identity gradient."""

from __future__ import annotations

import math

import pytest
import torch

from maml_ds.meta.precision import stochastic_round, stochastic_round_ste

DTYPES = (torch.bfloat16, torch.float16)
# Smallest magnitude scales still inside each format (the smallest reach its subnormals).
SCALES = {
    torch.bfloat16: (1e-39, 1e-20, 1e-3, 1.0, 1e3, 1e30),
    torch.float16: (1e-7, 1e-3, 1.0, 1e3),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spread_values(dtype: torch.dtype) -> torch.Tensor:
    """Random float32 values of both signs over the dtype's range of magnitudes."""
    g = generator(1)
    return torch.cat([torch.randn(2000, generator=g) * s for s in SCALES[dtype]])


def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values (float64) just below and just above x."""
    nearest = x.to(dtype)
    below = nearest.double() <= x.double()
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    return (
        torch.where(below, nearest, down).double(),
        torch.where(below, up, nearest).double(),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_result_is_one_of_the_two_neighbours(dtype: torch.dtype) -> None:
    x = spread_values(dtype)
    down, up = neighbours(x, dtype)
    assert (down <= x.double()).all() and (x.double() <= up).all()  # the reference brackets x
    rounded = stochastic_round(x, dtype, generator(0))
    assert rounded.dtype == dtype and rounded.shape == x.shape
    value = rounded.double()
    assert ((value == down) | (value == up)).all()
    assert (value == down).any() and (value == up).any()  # both ends occur


@pytest.mark.parametrize("dtype", DTYPES)
def test_representable_values_inf_and_nan_are_unchanged(dtype: torch.dtype) -> None:
    exact = spread_values(dtype).to(dtype).float()
    assert torch.equal(stochastic_round(exact, dtype, generator(0)).float(), exact)
    nan_low_payload = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    special = torch.cat([torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0]), nan_low_payload])
    rounded = stochastic_round(special, dtype, generator(0)).float()
    assert torch.equal(rounded[:2], special[:2])
    assert rounded[[2, 5]].isnan().all()
    assert torch.equal(rounded[3:5], special[3:5])
    assert torch.equal(rounded[3:5].signbit(), torch.tensor([False, True]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_of_draws_is_x(dtype: torch.dtype) -> None:
    num_draws = 40_000
    lows = torch.tensor([s * sign for s in SCALES[dtype] for sign in (1.7, -1.3)]).to(dtype)
    highs = torch.nextafter(lows, torch.full_like(lows, math.inf))
    fractions = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    lo, hi = lows.double()[:, None], highs.double()[:, None]
    x = (lo + fractions * (hi - lo)).float()  # (num_lows, 3): float32, 16+ bits below an ulp
    share = (x.double() - lo) / (hi - lo)  # the fraction x really sits at, after float32
    draws = stochastic_round(x.expand(num_draws, *x.shape), dtype, generator(0)).double()
    # Each draw is lo + ulp * Bernoulli(share): the mean's binomial std, 5 sigma.
    tolerance = 5 * (hi - lo) * torch.sqrt(share * (1 - share) / num_draws)
    assert ((draws.mean(0) - x.double()).abs() <= tolerance).all()
    # Round-to-nearest is off by min(share, 1 - share) ulp: far outside that tolerance.
    assert ((x.to(dtype).double() - x.double()).abs() > tolerance).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_per_generator_state(dtype: torch.dtype) -> None:
    x = spread_values(dtype)
    first = stochastic_round(x, dtype, generator(7))
    assert torch.equal(stochastic_round(x, dtype, generator(7)), first)
    assert not torch.equal(stochastic_round(x, dtype, generator(8)), first)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_generator_state_rounds_nearby_points_alike(dtype: torch.dtype) -> None:
    # Common random numbers: for one state the result grows with |x|, so a step of a fraction
    # of an ulp moves the rounded point by 0 or one ulp, never down.
    x = spread_values(dtype)
    further = x + x * torch.finfo(dtype).eps / 16  # 1/16 to 1/8 of an ulp away from zero
    near = stochastic_round(x, dtype, generator(5)).double()
    far = stochastic_round(further, dtype, generator(5)).double()
    assert (far.abs() >= near.abs()).all()
    down, up = neighbours(further, dtype)
    assert ((far - near).abs() <= up - down).all()
    assert (far != near).any()


def test_float32_and_same_dtype_are_identity() -> None:
    x = torch.randn(3, 5, generator=generator(0)) * 1e-3
    same = stochastic_round(x, torch.float32, generator(0))
    assert same.dtype == torch.float32 and torch.equal(same, x)
    x16 = x.to(torch.bfloat16)
    assert torch.equal(stochastic_round(x16, torch.bfloat16, generator(0)), x16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_straight_through_forward_is_rounded_and_gradient_is_identity(dtype: torch.dtype) -> None:
    x = torch.randn(64, 8, generator=generator(0)).requires_grad_()
    rounded = stochastic_round_ste(x, dtype, generator(3))
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded.detach(), stochastic_round(x.detach(), dtype, generator(3)).float())
    weights = torch.randn(64, 8, generator=generator(1))
    (rounded * weights).sum().backward()
    assert torch.equal(x.grad, weights)
