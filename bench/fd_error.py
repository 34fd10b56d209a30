"""Error of the finite-difference meta-gradient (`hvp-fd`) against `exact`, per precision.

For a tiny random-init GPT-2 (eval mode) and one MAML task, computes the meta-gradient in each
precision with `exact`, `first-order` and `hvp-fd` (one-sided and central, a sweep of the
relative FD step r = ||eps w|| / ||theta||) and prints its relative error
||g - g_ref|| / ||g_ref|| against the float64 `exact` meta-gradient at the same weights (for
bf16: the bf16-rounded weights). The `exact` row of a precision is its rounding floor; the
`first-order` row is the error of dropping the second-order term altogether.

    python bench/fd_error.py            # the table in docs/meta-gradient.md
    python bench/fd_error.py --k 2 --inner sgd --inner-lr 1.0

Not a test: a measurement whose output goes into the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

from maml_ds.meta import (
    InnerStepConfig,
    default_fd_scale,
    inner_step,
    meta_gradient,
    new_adamw_state,
)

FD_SCALES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


@dataclass(frozen=True)
class Precision:
    """How the meta-gradient is computed: parameter dtype, and autocast dtype if any."""

    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.param_dtype


PRECISIONS = (
    Precision("float64", torch.float64),
    Precision("float32", torch.float32),
    Precision("bf16", torch.bfloat16),
    Precision("fp32+bf16 autocast", torch.float32, torch.bfloat16),
)


def build_model(seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def make_loss_fn(
    model: GPT2LMHeadModel,
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Next-token cross entropy from the logits, in at least float32.

    Not `labels=`: transformers' loss casts logits to float32 even for float64 models, which
    puts a ~1e-8 noise floor under every float64 comparison.
    """

    def loss_fn(params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (ids,)).logits  # (b, t, vocab)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return loss_fn


def warm_adamw_state(
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor],
    batches: list[torch.Tensor],
) -> dict:
    """AdamW moments after one step per batch at `params` (lr 0: params stay), as after warm-up.

    A fresh state makes step 1 ill-conditioned: D_j = (1-b1)/((1-b1)(|g|+eps)) ~ 1/|g| blows up
    on near-zero gradients (e.g. attention key biases), and the meta-gradient then measures that.
    """
    state = new_adamw_state(params)
    config = InnerStepConfig(lr=0.0, optimizer="adamw")
    for batch in batches:
        params_ = {n: p.detach().requires_grad_() for n, p in params.items()}
        grads = torch.autograd.grad(loss_fn(params_, batch), list(params_.values()))
        _, state = inner_step(params, dict(zip(params, grads, strict=True)), config, state)
    return state


def meta_gradient_error(
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor],
    support: list[torch.Tensor],
    query: list[torch.Tensor],
    reference: dict[str, torch.Tensor],
    precision: Precision,
    **kwargs: Any,
) -> float:
    """Relative error of meta_gradient(**kwargs) in `precision` against `reference`."""
    autocast = (
        torch.autocast("cpu", dtype=precision.autocast_dtype)
        if precision.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:  # around the call, so that meta_gradient picks the bf16 default r
        grads = meta_gradient(loss_fn, params, support, query, **kwargs).grads
    return relative_error(grads, reference)


def relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    num = sum(float(((grads[n].double() - reference[n]) ** 2).sum()) for n in reference)
    den = sum(float((reference[n] ** 2).sum()) for n in reference)
    return math.sqrt(num / den)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--k", type=int, default=1, help="inner steps (support = query batches)")
    parser.add_argument("--inner", choices=("sgd", "adamw"), default="adamw")
    parser.add_argument("--inner-lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup", type=int, default=10, help="AdamW steps that warm the moments up (0: fresh)"
    )
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = [
        torch.randint(0, 50, (args.batch, args.seq), generator=generator)
        for _ in range(2 * args.k + args.warmup)
    ]
    support, query = batches[: args.k], batches[args.k : 2 * args.k]
    warmup_batches = batches[2 * args.k :]
    base = build_model(args.seed)

    summary, sweep = [], []
    for precision in PRECISIONS:
        # Reference: float64 exact at this precision's (rounded) weights, same warm moments.
        rounded = {n: p.detach().to(precision.param_dtype) for n, p in base.named_parameters()}
        loss64 = make_loss_fn(build_model(args.seed).double())
        params64 = {n: p.double() for n, p in rounded.items()}
        kwargs: dict = {"inner_lr": args.inner_lr, "inner_optimizer": args.inner}
        if args.inner == "adamw":
            kwargs["adam_state"] = warm_adamw_state(loss64, params64, warmup_batches)
        reference = meta_gradient(loss64, params64, support, query, **kwargs).grads
        if args.inner == "adamw":  # the same moments, in this precision
            kwargs["adam_state"] = {
                n: {k: t if k == "step" else t.to(precision.param_dtype) for k, t in s.items()}
                for n, s in kwargs["adam_state"].items()
            }

        loss_fn = make_loss_fn(build_model(args.seed).to(precision.param_dtype))
        params = {n: p.clone() for n, p in rounded.items()}

        error = functools.partial(
            meta_gradient_error, loss_fn, params, support, query, reference, precision, **kwargs
        )

        summary.append(
            [
                precision.name,
                f"{error(second_order='exact'):.1e}",
                f"{error(second_order='first-order'):.1e}",
                *(
                    f"{error(second_order='hvp-fd', fd_mode=m):.1e} "
                    f"(r={default_fd_scale(precision.compute_dtype, m):g})"
                    for m in ("one-sided", "central")
                ),
            ]
        )
        for fd_mode in ("one-sided", "central"):
            errors = [error(second_order="hvp-fd", fd_mode=fd_mode, fd_scale=r) for r in FD_SCALES]
            cells = [f"**{e:.1e}**" if e == min(errors) else f"{e:.1e}" for e in errors]
            sweep.append([precision.name, fd_mode, *cells])

    print(
        f"tiny GPT-2 (2x32, eval), k={args.k}, inner {args.inner} lr={args.inner_lr}"
        + (f" (moments warmed up over {args.warmup} batches)" if args.inner == "adamw" else "")
        + f", batches {args.batch}x{args.seq}.\n"
        "Relative error ||g - g_ref|| / ||g_ref|| of the meta-gradient; g_ref: float64 exact.\n"
    )
    print_table(
        [
            "precision",
            "exact",
            "first-order",
            "hvp-fd one-sided (default r)",
            "hvp-fd central (default r)",
        ],
        summary,
    )
    print()
    print_table(["precision", "fd_mode", *(f"r={r:g}" for r in FD_SCALES)], sweep)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
