"""Wall time per processed batch of each meta-gradient mode, relative to a plain MetaICL step.

MetaICL step: forward + backward + SharedMomentAdamW step on one batch. MAML-2k-1 step:
`meta_gradient` on k support + k query batches (AdamW inner steps on the shared moments;
hvp-fd keeps the support gradients from the forward pass, k - 1 of them as the engine does by
default: --keep-support-gradients), moments written back,
outer step; it processes 2k batches. The ratio printed is

    (median seconds per MAML step / 2k) / (median seconds per MetaICL step)

measured in one run on the same batches, methods interleaved within each repeat.

    python bench/meta_step.py                   # tiny GPT-2, the table in docs/meta-gradient.md
    python bench/meta_step.py --size larger     # 6 x 256 GPT-2
    python bench/meta_step.py --threads 2 --k 2
    python bench/meta_step.py --memory          # peak live tensor bytes vs k, per mode
    python bench/meta_step.py --k 4 --keep-support-gradients 1   # g_S(theta_0) kept only

Not a test: targets (first-order <= 1.05x, hvp-fd one-sided <= 1.6x) are reported, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

from maml_ds.config import kept_support_gradients
from maml_ds.meta import LiveTensorBytes, SharedMomentAdamW, meta_gradient

SIZES: dict[str, dict[str, int]] = {
    # name: GPT-2 architecture + batch (sequences x tokens)
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 1024, "batch": 4, "seq": 128},
    "larger": {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab": 8192, "batch": 4, "seq": 256},
}
# (label, second_order, fd_mode, target ratio or None)
MODES: tuple[tuple[str, str, str, float | None], ...] = (
    ("first-order", "first-order", "one-sided", 1.05),
    ("hvp-fd one-sided", "hvp-fd", "one-sided", 1.6),
    ("hvp-fd central", "hvp-fd", "central", None),
    ("hvp", "hvp", "one-sided", None),
    ("exact", "exact", "one-sided", None),
)


def build(size: str, device: torch.device, seed: int) -> GPT2LMHeadModel:
    s = SIZES[size]
    config = GPT2Config(
        n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"], vocab_size=s["vocab"],
        n_positions=s["seq"], bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(device).train()  # dropout on, as in training


def metaicl_step(
    model: GPT2LMHeadModel, opt: SharedMomentAdamW, batch: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def maml_step(
    model: GPT2LMHeadModel,
    opt: SharedMomentAdamW,
    support: list[torch.Tensor],
    query: list[torch.Tensor],
    *,
    second_order: str,
    fd_mode: str,
    inner_lr: float,
    keep: int,
) -> Callable[[], None]:
    named = dict(model.named_parameters())

    def loss_fn(params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (ids,), {"labels": ids}).loss

    def step() -> None:
        kwargs: dict[str, Any] = opt.inner_kwargs(named)
        result = meta_gradient(
            loss_fn, named, support, query, inner_lr=inner_lr, second_order=second_order,  # type: ignore[arg-type]
            fd_mode=fd_mode, keep_support_gradients=keep, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
        opt.load_inner_state(named, result.adam_state)
        for name, p in named.items():
            p.grad = result.grads[name]
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(size: str, num: int, device: torch.device) -> list[torch.Tensor]:
    s = SIZES[size]
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=generator).to(device)
        for _ in range(num)
    ]


def time_modes(args: argparse.Namespace, device: torch.device) -> None:
    """Print the ratio table: median wall time per processed batch vs MetaICL."""
    s = SIZES[args.size]
    batches = make_batches(args.size, 2 * args.k, device)
    steps: dict[str, Callable[[], None]] = {}
    model = build(args.size, device, seed=0)
    steps["metaicl"] = metaicl_step(
        model, SharedMomentAdamW(model.parameters(), lr=1e-5), batches[0]
    )
    for label, second_order, fd_mode, _ in MODES:
        model = build(args.size, device, seed=0)
        opt = SharedMomentAdamW(model.parameters(), lr=1e-5)
        steps[label] = maml_step(
            model, opt, batches[: args.k], batches[args.k :], second_order=second_order,
            fd_mode=fd_mode, inner_lr=args.inner_lr,
            keep=kept_support_gradients(args.keep_support_gradients, args.k),
        )  # fmt: skip

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.repeats):
        for label, step in steps.items():  # interleaved: drift hits every method alike
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[label].append(time.perf_counter() - start)

    num_params = sum(p.numel() for p in model.parameters())
    base = statistics.median(times["metaicl"])
    print(
        f"GPT-2 {s['n_layer']}x{s['n_embd']} ({num_params / 1e6:.2f}M params, vocab {s['vocab']}), "
        f"batch {s['batch']}x{s['seq']}, MAML-{2 * args.k}-1, AdamW inner (shared moments), "
        f"{device.type} {args.threads} thread(s), median of {args.repeats}"
    )
    print("| method | ms per meta-update | ms per batch | ratio to MetaICL | target |")
    print("|---|---|---|---|---|")
    print(f"| MetaICL | {base * 1e3:.1f} | {base * 1e3:.1f} | 1.00 | |")
    for label, _, _, target in MODES:
        per_update = statistics.median(times[label])
        per_batch = per_update / (2 * args.k)
        ratio = per_batch / base
        verdict = (
            "" if target is None else f"<= {target} ({'met' if ratio <= target else 'MISSED'})"
        )
        cells = [
            label,
            f"{per_update * 1e3:.1f}",
            f"{per_batch * 1e3:.1f}",
            f"{ratio:.2f}",
            verdict,
        ]
        print("| " + " | ".join(cells) + " |")


def memory_table(args: argparse.Namespace, device: torch.device) -> None:
    """Print peak live tensor bytes of one meta-gradient per mode and k, in parameter copies."""
    ks = (1, 2, 3, 4, 6)
    s = SIZES[args.size]
    model = build(args.size, device, seed=0)
    named = dict(model.named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in named.values())

    def loss_fn(params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (ids,), {"labels": ids}).loss

    batch = make_batches(args.size, 1, device)[0]
    with LiveTensorBytes() as mem:  # one MetaICL forward + backward, for scale
        model(batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    print(
        f"GPT-2 {s['n_layer']}x{s['n_embd']}, batch {s['batch']}x{s['seq']}, AdamW inner "
        f"(fresh moments): peak live tensor bytes of one meta_gradient call / S(theta) "
        f"(S(theta) = {param_bytes / 2**20:.2f} MiB; MetaICL forward+backward: "
        f"{mem.peak_bytes / param_bytes:.2f})"
    )
    print("| mode | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for label, second_order, fd_mode, _ in MODES:
        row = []
        for k in ks:
            batches = make_batches(args.size, 2 * k, device)
            with LiveTensorBytes() as mem:
                result = meta_gradient(
                    loss_fn, named, batches[:k], batches[k:], inner_lr=args.inner_lr,
                    inner_optimizer="adamw", second_order=second_order,  # type: ignore[arg-type]
                    fd_mode=fd_mode,  # type: ignore[arg-type]
                )  # fmt: skip
                del result
            row.append(f"{mem.peak_bytes / param_bytes:.2f}")
        print(f"| {label} | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--k", type=int, default=1, help="inner steps (MAML-2k-1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--inner-lr", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--keep-support-gradients",
        type=int,
        default=None,
        help="hvp-fd, k >= 2: support gradients kept from the forward pass for the reverse pass "
        "(meta_gradient's keep_support_gradients; default k - 1, as the engine: no support pass "
        "in any replay; 1 = g_S(theta_0) only; 0: every one recomputed)",
    )
    parser.add_argument(
        "--memory", action="store_true", help="print peak live tensor bytes vs k instead of times"
    )
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory:
        memory_table(args, device)
    else:
        time_modes(args, device)


if __name__ == "__main__":
    main()
