"""Does an inner step reach a 16-bit forward? Round-to-nearest against stochastic rounding.

A tiny random-init GPT-2 from two theta_0: the fp32 init, and the init rounded to 16 bits (a
16-bit checkpoint: no sub-ulp bits). Part 1: one sign-like AdamW first step (fresh moments) per
lr; the share of it that survives nearest rounding, its cosine with SR(theta + delta) - SR(theta),
and the support-loss change it gives. Part 2: the meta-gradient (`meta_gradient`, hvp-fd and
first-order; AdamW inner steps on warm and on fresh moments, SGD) with fp32 master params and a
16-bit model (nearest, or SR seeded per batch as --adapted-rounding stochastic) against fp32
throughout.

    python bench/adapted_rounding.py                   # bf16, both parts
    python bench/adapted_rounding.py --part 1 --dtype fp16 --lrs 1e-6,1e-5,1e-4

Not a test: measurements for docs/memory.md ("Precision of the adaptation"), no targets.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

from maml_ds.meta import (
    OptimizerName,
    SecondOrder,
    default_fd_scale,
    inner_update_kept,
    meta_gradient,
    new_adamw_state,
    stochastic_round,
    stochastic_round_ste,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Params = dict[str, Tensor]


def build_model(seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=64,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()  # eval: no dropout, every loss is deterministic


def next_token_loss(model: GPT2LMHeadModel, params: Params, tokens: Tensor) -> Tensor:
    """Next-token cross entropy, in float64 from the logits (of the model's dtype)."""
    logits = functional_call(model, params, (tokens,)).logits  # (batch, seq, vocab)
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), tokens[:, 1:].flatten())


def sign_like_step(model: GPT2LMHeadModel, tokens: Tensor, lr: float) -> tuple[Params, Params]:
    """theta (fp32) and AdamW's first step from it: -lr g / (|g| + eps), fresh moments."""
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    next_token_loss(model, dict(model.named_parameters()), tokens).backward()
    delta = {name: -lr * p.grad / (p.grad.abs() + 1e-8) for name, p in model.named_parameters()}
    return theta, delta


def rounded(point: Params, dtype: torch.dtype, seed: int) -> Params:
    """The point stochastically rounded, tensors in a fixed order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return {name: stochastic_round(t, dtype, generator) for name, t in point.items()}


def flat(params: Params) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in params.values()])


def cosine(a: Tensor, b: Tensor) -> float:
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms else 0.0


def measure(
    model: GPT2LMHeadModel, tokens: Tensor, lr: float, dtype: torch.dtype, num_draws: int
) -> dict[str, float]:
    theta, delta = sign_like_step(model, tokens, lr)
    adapted = {name: theta[name] + delta[name] for name in theta}
    model16 = copy.deepcopy(model).to(dtype)
    intended = flat(adapted) - flat(theta)  # the fp32 step as applied (float64 difference)

    with torch.no_grad():
        ref = next_token_loss(model, adapted, tokens) - next_token_loss(model, theta, tokens)
        nearest = {name: t.to(dtype) for name, t in adapted.items()}
        start = {name: t.to(dtype) for name, t in theta.items()}
        nearest_change = next_token_loss(model16, nearest, tokens) - next_token_loss(
            model16, start, tokens
        )
        realised_sum = torch.zeros_like(intended)
        single_cosines, loss_changes = [], []
        for draw in range(num_draws):
            at_adapted, at_start = rounded(adapted, dtype, draw), rounded(theta, dtype, draw)
            realised = flat(at_adapted) - flat(at_start)
            realised_sum += realised
            single_cosines.append(cosine(realised, intended))
            change = next_token_loss(model16, at_adapted, tokens) - next_token_loss(
                model16, at_start, tokens
            )
            loss_changes.append(float(change))

    kept = inner_update_kept(theta, adapted, dtype)
    return {
        "kept": kept.share_kept,
        "cos_nearest": kept.cosine,
        "cos_sr_single": statistics.fmean(single_cosines),
        "cos_sr_mean": cosine(realised_sum / num_draws, intended),
        "dl_ref": float(ref),
        "dl_nearest": float(nearest_change),
        "dl_sr": statistics.fmean(loss_changes),
        "dl_sr_std": statistics.stdev(loss_changes) if num_draws > 1 else math.nan,
    }


def checkpoint_copy(model: GPT2LMHeadModel, dtype: torch.dtype) -> GPT2LMHeadModel:
    """The model as loaded from a 16-bit checkpoint: fp32 weights that are exactly
    representable in `dtype` (no sub-ulp bits to dither the rounding of a small step)."""
    loaded = copy.deepcopy(model)
    with torch.no_grad():
        for p in loaded.parameters():
            p.copy_(p.to(dtype))
    return loaded


def print_step_tables(results: list[tuple[float, str, dict[str, float]]], dtype_name: str) -> None:
    print(f"\nPart 1. The step in the {dtype_name} forward (cosine with the fp32 step delta)")
    print(f"{'lr':>6} {'theta_0':>9} {'kept nearest':>13} {'cos nearest':>12} ", end="")
    print(f"{'cos SR 1 draw':>14} {'cos SR mean D':>14}")
    for lr, start, r in results:
        print(
            f"{lr:>6.0e} {start:>9} {r['kept']:>13.1%} {r['cos_nearest']:>12.3f} "
            f"{r['cos_sr_single']:>14.3f} {r['cos_sr_mean']:>14.3f}"
        )

    print("\nSupport-loss change L(theta_0 + delta) - L(theta_0), (ratio to fp32)")
    print(f"{'lr':>6} {'theta_0':>9} {'fp32':>10} {dtype_name + ' nearest':>17} ", end="")
    print(f"{dtype_name + ' SR mean +- std':>28}")
    for lr, start, r in results:
        ref = r["dl_ref"]
        nearest = f"{r['dl_nearest']:.2e} ({r['dl_nearest'] / ref:.2f})"
        sr = f"{r['dl_sr']:.2e} +- {r['dl_sr_std']:.1e} ({r['dl_sr'] / ref:.2f})"
        print(f"{lr:>6.0e} {start:>9} {ref:>10.2e} {nearest:>17} {sr:>28}")


# --- part 2: the meta-gradient ----------------------------------------------------------------

LossFn = Callable[[Params, dict[str, Any]], Tensor]


def model_loss_fn(model: GPT2LMHeadModel) -> LossFn:
    """The loss at params as they are, in the model's dtype (the fp32 reference)."""
    return lambda params, batch: next_token_loss(model, params, batch["tokens"])


def rounding_loss_fn(model16: GPT2LMHeadModel, dtype: torch.dtype, stochastic: bool) -> LossFn:
    """The loss at fp32 params rounded into the 16-bit model, straight-through: to nearest, or
    stochastically from a generator seeded with the batch's `rounding_seed` (every pass on one
    batch draws the same numbers, as the engine's `make_loss_fn`)."""

    def loss_fn(params: Params, batch: dict[str, Any]) -> Tensor:
        if stochastic:
            generator = torch.Generator().manual_seed(batch["rounding_seed"])
            params = {
                name: stochastic_round_ste(p, dtype, generator).to(dtype)
                for name, p in params.items()
            }
        else:
            params = {name: p.to(dtype) for name, p in params.items()}
        return next_token_loss(model16, params, batch["tokens"])

    return loss_fn


INNER_STEPS: dict[str, tuple[OptimizerName, bool, str]] = {
    "adamw-warm": ("adamw", True, "AdamW (warm moments)"),
    "adamw-fresh": ("adamw", False, "AdamW (fresh moments)"),
    "sgd": ("sgd", False, "SGD"),
}
"""--inner: optimizer, warm moments, title. Warm: v = the mean g^2 of WARM_BATCHES random batches
at theta_0, m = 0, step 100 (what shared moments are after some updates). Fresh-moment AdamW
steps by -lr g / (|g| + eps): the second-order term weighs each element by 1 / (|g| + eps),
where a 16-bit gradient's small elements are furthest off; SGD has no such weights (but a
small second-order term at these lrs)."""
WARM_BATCHES = 8


def warm_moments(model: GPT2LMHeadModel, generator: torch.Generator) -> dict[str, Any]:
    """AdamW moments of a run that has trained a while (see INNER_STEPS), fp32."""
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    state = new_adamw_state(params)
    for _ in range(WARM_BATCHES):
        tokens = torch.randint(0, model.config.vocab_size, (8, 64), generator=generator)
        grads = torch.autograd.grad(next_token_loss(model, params, tokens), list(params.values()))
        for name, g in zip(params, grads, strict=True):
            state[name]["exp_avg_sq"].add_(g.detach().square() / WARM_BATCHES)
    for moments in state.values():
        moments["step"].fill_(100.0)
    return state


TASK_VOCAB = 32
"""Tokens per task: a task's batches share a unigram distribution, so that adapting on the
support batches lowers the query loss (uniform random tokens give adaptation nothing to find)."""


def task_batches(
    generator: torch.Generator, vocab_size: int, shape: tuple[int, int], task_vocab: int, num: int
) -> list[Tensor]:
    """`num` batches of one task: tokens drawn uniformly from `task_vocab` random token ids."""
    vocab = torch.randperm(vocab_size, generator=generator)[:task_vocab]
    return [vocab[torch.randint(0, task_vocab, shape, generator=generator)] for _ in range(num)]


def seeded(batches: list[Tensor], draw: int) -> list[dict[str, Any]]:
    """The batches of one SR draw: batch i rounds with seed (draw, i)."""
    return [
        {"tokens": tokens, "rounding_seed": 1_000 * (draw + 1) + i}
        for i, tokens in enumerate(batches)
    ]


class MetaRun(NamedTuple):
    grads: Tensor  # flat meta-gradient, float64
    adaptation_gain: float  # L_Q(theta_k) - L_Q(theta_0)


def meta_run(
    loss_fn: LossFn,
    theta0: Params,
    support: list[dict[str, Any]],
    query: list[dict[str, Any]],
    *,
    mode: SecondOrder,
    lr: float,
    optimizer: OptimizerName,
    fd_scale: float | None,
    moments: dict[str, Any] | None = None,
) -> MetaRun:
    dtype = next(iter(theta0.values())).dtype
    state = None
    if moments is not None:  # in theta_0's dtype (the float64 reference), a copy per run
        state = {n: {k: v.to(dtype, copy=True) for k, v in m.items()} for n, m in moments.items()}
    result = meta_gradient(
        loss_fn, theta0, support, query, inner_lr=lr, inner_optimizer=optimizer,
        second_order=mode, fd_mode="one-sided", fd_scale=fd_scale, adam_state=state,
    )  # fmt: skip
    with torch.no_grad():
        start_loss = torch.stack([loss_fn(theta0, batch) for batch in query]).mean()
    return MetaRun(flat(result.grads), float(result.query_loss - start_loss))


def relative_error(g: Tensor, ref: Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


def mean_std(values: list[float], spec: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):{spec}}+-{std:{spec}}"


def meta_gradient_accuracy(
    model: GPT2LMHeadModel,
    batches: list[Tensor],
    mode: SecondOrder,
    num_steps: int,
    lr: float,
    *,
    dtype: torch.dtype,
    optimizer: OptimizerName,
    num_draws: int,
    moments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One (mode, k, lr, theta_0): the fp32 reference, nearest, and D SR meta-gradients."""
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    model16 = copy.deepcopy(model).to(dtype)
    support, query = batches[:num_steps], batches[num_steps : 2 * num_steps]
    run = functools.partial(
        meta_run, theta0=theta0, mode=mode, lr=lr, optimizer=optimizer, moments=moments
    )
    fd_16 = default_fd_scale(dtype, "one-sided")  # params are fp32: pass the 16-bit default

    def task(draw: int) -> dict[str, list[dict[str, Any]]]:
        batches = seeded(support + query, draw)
        return {"support": batches[:num_steps], "query": batches[num_steps:]}

    ref = run(model_loss_fn(model), **task(0), fd_scale=None)
    nearest = run(rounding_loss_fn(model16, dtype, stochastic=False), **task(0), fd_scale=fd_16)
    sr_loss_fn = rounding_loss_fn(model16, dtype, stochastic=True)
    draws = [run(sr_loss_fn, **task(draw), fd_scale=fd_16) for draw in range(num_draws)]
    sr_mean = torch.stack([d.grads for d in draws]).mean(0)
    ref_error = math.nan  # the fp32 hvp-fd reference against exact HVPs in float64
    if mode == "hvp-fd":
        exact = run(
            model_loss_fn(copy.deepcopy(model).double()),
            theta0={name: p.double() for name, p in theta0.items()},
            mode="hvp", **task(0), fd_scale=None,
        )  # fmt: skip
        ref_error = relative_error(ref.grads, exact.grads)
    return {
        "ref_error": ref_error,
        "cos_nearest": cosine(nearest.grads, ref.grads),
        "err_nearest": relative_error(nearest.grads, ref.grads),
        "cos_sr": [cosine(d.grads, ref.grads) for d in draws],
        "err_sr": [relative_error(d.grads, ref.grads) for d in draws],
        "cos_sr_mean": cosine(sr_mean, ref.grads),
        "err_sr_mean": relative_error(sr_mean, ref.grads),
        "gain_ref": ref.adaptation_gain,
        "gain_nearest": nearest.adaptation_gain,
        "gain_sr": [d.adaptation_gain for d in draws],
    }


def print_meta_gradient_tables(
    results: list[tuple[SecondOrder, int, float, str, dict[str, Any]]],
    dtype_name: str,
    inner_steps: str,
) -> None:
    head = f"{'mode':>11} {'k':>1} {'lr':>6} {'theta_0':>9}"
    for title, key in (("cos(g, g_ref)", "cos"), ("|g - g_ref| / |g_ref|", "err")):
        print(f"\nPart 2, {inner_steps}: meta-gradient g at {dtype_name}, {title}")
        print(f"{head} {'nearest':>9} {'SR 1 run (mean+-std)':>21} {'SR mean of D':>13}")
        for mode, k, lr, start, r in results:
            print(
                f"{mode:>11} {k:>1} {lr:>6.0e} {start:>9} {r[key + '_nearest']:>9.3f} "
                f"{mean_std(r[key + '_sr'], '.3f'):>21} {r[key + '_sr_mean']:>13.3f}"
            )
    print("\nWhat adaptation buys: L_Q(theta_k) - L_Q(theta_0), each in its own precision;")
    print("ref err: the fp32 hvp-fd g_ref's relative error against exact HVPs in float64")
    print(f"{'k':>1} {'lr':>6} {'theta_0':>9} {'fp32':>10} {dtype_name + ' nearest':>13}", end="")
    print(f" {dtype_name + ' SR mean+-std':>22} {'ref err':>8}")
    for mode, k, lr, start, r in results:
        if mode != "hvp-fd":
            continue  # the same inner steps as first-order
        sr = mean_std(r["gain_sr"], ".2e")
        print(
            f"{k:>1} {lr:>6.0e} {start:>9} {r['gain_ref']:>10.2e} {r['gain_nearest']:>13.2e}"
            f" {sr:>22} {r['ref_error']:>8.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=32, help="part 1: SR draws per lr (D)")
    parser.add_argument("--lrs", default="1e-5,1e-4,1e-3", help="part 1: inner learning rates")
    parser.add_argument("--meta-draws", type=int, default=8, help="part 2: SR runs per row (D)")
    parser.add_argument("--meta-lrs", default="1e-5,1e-4", help="part 2: inner learning rates")
    parser.add_argument(
        "--inner", default=",".join(INNER_STEPS), help=f"part 2: of {', '.join(INNER_STEPS)}"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]

    model = build_model(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq)
    tokens = torch.randint(0, model.config.vocab_size, shape, generator=generator)
    num_params = sum(p.numel() for p in model.parameters())
    print("$ python " + shlex.join(sys.argv))
    print(
        f"GPT-2 2 x 128, vocab 512, {num_params:,} parameters, random init (seed {args.seed})\n"
        f"batches {args.batch} x {args.seq}, {args.dtype}, D = {args.draws} SR draws (part 1), "
        f"{args.meta_draws} SR runs (part 2)\n"
        f"theta_0: 'fp32 init' = the init; '{args.dtype} ckpt' = the init rounded to "
        f"{args.dtype},\n  as fp32 weights loaded from a 16-bit checkpoint are"
    )
    starts = {"fp32 init": model, f"{args.dtype} ckpt": checkpoint_copy(model, dtype)}
    started = time.perf_counter()
    if args.part in ("1", "all"):
        results = [
            (lr, start, measure(start_model, tokens, lr, dtype, args.draws))
            for lr in map(float, args.lrs.split(","))
            for start, start_model in starts.items()
        ]
        print_step_tables(results, args.dtype)
    if args.part in ("2", "all"):
        batches = task_batches(generator, model.config.vocab_size, shape, TASK_VOCAB, 4)
        print(
            f"\nPart 2: k support + k query batches of one task (tokens from {TASK_VOCAB} of "
            f"the {model.config.vocab_size});\n  fp32 master params, {args.dtype} forward: "
            f"params rounded per pass (nearest, or SR\n  seeded per batch), fd_scale "
            f"{default_fd_scale(dtype, 'one-sided'):g}; g_ref: all fp32, fd_scale "
            f"{default_fd_scale(torch.float32, 'one-sided'):g} (one-sided)"
        )
        for inner in args.inner.split(","):
            optimizer, warm, title = INNER_STEPS[inner]
            moments = (
                {
                    start: warm_moments(start_model, torch.Generator().manual_seed(args.seed + 7))
                    for start, start_model in starts.items()
                }
                if warm
                else dict.fromkeys(starts)
            )
            meta_results = [
                (mode, k, lr, start, meta_gradient_accuracy(
                    start_model, batches, mode, k, lr, dtype=dtype, optimizer=optimizer,
                    num_draws=args.meta_draws, moments=moments[start],
                ))
                for mode in ("hvp-fd", "first-order")
                for k in (1, 2)
                for lr in map(float, args.meta_lrs.split(","))
                for start, start_model in starts.items()
            ]  # fmt: skip
            print_meta_gradient_tables(meta_results, args.dtype, title)
    print(f"\n({time.perf_counter() - started:.1f} s; SR mean's standard error is std / sqrt(D))")


if __name__ == "__main__":
    main()
