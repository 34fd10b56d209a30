"""How much of an inner step reaches a 16-bit forward (docs/memory.md, "Precision of the
adaptation").

At bf16/fp16 the adapted parameters are rounded into the model dtype before every pass, and an
inner step below the 16-bit resolution of a weight vanishes there. `inner_update_kept` compares
the intended step (fp32) with the realised one (both points rounded to the model dtype).
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
