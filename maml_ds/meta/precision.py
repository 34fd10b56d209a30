"""How much of an inner step reaches a 16-bit forward (docs/memory.md, "Precision of the
adaptation").

At bf16/fp16 the adapted parameters are rounded into the model dtype before every pass, and an
inner step below the 16-bit resolution of a weight vanishes there. `inner_update_kept` compares
the intended step (fp32) with the realised one (both points rounded to the model dtype).
`stochastic_round` rounds a point unbiasedly instead (E = x), so the step survives in expectation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

CHUNK = 1 << 16
"""Elements compared at a time: the comparison holds a few chunk-sized temporaries, never a
parameter-sized vector."""


class UpdateRounding(NamedTuple):
    """Sums over elements (add them over ranks for a partitioned step, `from_sums`)."""

    intended: float  # elements the fp32 step changes
    kept: float  # elements whose rounded value changes
    dot: float  # <realised, intended>
    realised_sq: float  # |realised|^2
    intended_sq: float  # |intended|^2

    @classmethod
    def from_sums(cls, sums: Tensor) -> UpdateRounding:
        return cls(*(float(x) for x in sums.tolist()))

    def as_tensor(self) -> Tensor:
        return torch.tensor(list(self), dtype=torch.float64)

    @property
    def share_kept(self) -> float:
        """Of the elements the step changes, the share that changes in the 16-bit forward."""
        return self.kept / self.intended if self.intended else 1.0

    @property
    def cosine(self) -> float:
        """cos(realised, intended): 1 when the forward sees the step's direction exactly."""
        norms = math.sqrt(self.realised_sq * self.intended_sq)
        return self.dot / norms if norms else (1.0 if self.intended == 0 else 0.0)


@torch.no_grad()
def inner_update_kept(
    before: Mapping[str, Tensor], after: Mapping[str, Tensor], dtype: torch.dtype
) -> UpdateRounding:
    """The step after - before (fp32 tensors of one key set) against the same step between the
    two points rounded to `dtype`, as the forward passes see them."""
    sums = torch.zeros(5, dtype=torch.float64)
    for key, a in before.items():
        a, b = a.reshape(-1), after[key].reshape(-1)
        for lo in range(0, a.numel(), CHUNK):
            x, y = a[lo : lo + CHUNK], b[lo : lo + CHUNK]
            intended = (y - x).double()
            realised = y.to(dtype).double() - x.to(dtype).double()
            sums += torch.stack(
                [
                    (intended != 0).sum().double(),
                    (realised != 0).sum().double(),
                    (realised * intended).sum(),
                    realised.pow(2).sum(),
                    intended.pow(2).sum(),
                ]
            ).cpu()
    return UpdateRounding.from_sums(sums)


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """x (float32) rounded into `dtype` up or down at random, up with probability
    (x - lo) / (hi - lo) for the two representable neighbours lo <= x <= hi, so E[result] = x.

    Same shape and device as x; the random numbers come from `generator` (one on x's device, or
    None for that device's default), so a generator state gives one result, and for one state the
    result grows with |x| (common random numbers round nearby points alike). Representable values,
    inf and nan come back unchanged; beyond the largest finite fp16 value it rounds to nearest,
    beyond the largest finite bf16 value inf is the neighbour above. Not chunked: temporaries are
    one x-sized int32 tensor (bf16) or about four x-sized float32 tensors (fp16).
    """
    if x.dtype == dtype or (x.dtype == torch.float32 and dtype == torch.float64):
        return x.to(dtype)
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic rounding takes float32, got {x.dtype}")
    if dtype == torch.bfloat16:
        return _stochastic_round_bf16(x, generator)
    if dtype == torch.float16:
        return _stochastic_round_bracket(x, dtype, generator)
    raise ValueError(f"no stochastic rounding into {dtype} (bfloat16, float16, float32)")


def _stochastic_round_bf16(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # bf16 is the top 16 bits of float32. Adding a uniform integer in [0, 2**16) to the bits
    # carries into bit 16 (one bf16 ulp up, in magnitude: the sign bit is apart) with
    # probability low16 / 2**16 = (|x| - |lo|) / ulp; clearing the low bits then truncates, and
    # the conversion of the truncated value is exact.
    bits = torch.randint(
        0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    bits.add_(x.view(torch.int32)).bitwise_and_(-(1 << 16))
    rounded = bits.view(torch.float32).to(torch.bfloat16)
    # A nan whose payload lies in the low bits only would be truncated to inf.
    return rounded.masked_fill_(x.isnan(), float("nan"))


def _stochastic_round_bracket(
    x: Tensor, dtype: torch.dtype, generator: torch.Generator | None
) -> Tensor:
    # lo: x truncated toward zero into dtype, hi: its neighbour away from zero. Away from zero
    # when u < (|x| - |lo|) / (|hi| - |lo|) (both differences exact in float32), so for one u
    # the result grows with |x|, as in the bf16 trick.
    nearest = x.to(dtype)
    overshoots = (nearest.float().abs_() > x.abs()) & nearest.isfinite()
    lo = torch.where(overshoots, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    del nearest, overshoots
    hi = torch.nextafter(lo, torch.full_like(x, math.inf).copysign_(x).to(dtype))
    lo_magnitude = lo.float().abs_()
    # Beyond the finite range the share is 0 (hi inf) or nan (lo inf): lo, the nearest value.
    share = x.abs().sub_(lo_magnitude).div_(hi.float().abs_().sub_(lo_magnitude))
    del lo_magnitude
    away = torch.rand(x.shape, generator=generator, device=x.device) < share
    return torch.where(away, hi, lo)


def stochastic_round_ste(
    x: Tensor, dtype: torch.dtype, generator: torch.Generator | None
) -> Tensor:
    """`stochastic_round` for autograd callers: the forward sees the rounded values (in x's
    dtype), the gradient passes through as identity (straight-through)."""
    rounded = stochastic_round(x.detach(), dtype, generator).to(x.dtype)
    return x + (rounded - x).detach()
