"""MAML-en-LLM through the DeepSpeed engine vs MetaICL: time per batch, where it goes, memory vs n.

One run, one config: a model trained by `maml_ds.training.loop.setup` on a synthetic suite (prompts of
exactly --seq-len tokens), DeepSpeed at --zero / --precision, buckets of 2e5 elements, this
process's ranks. Four parts, all through `setup` + the real step functions (`metaicl_step`,
`maml_ds.training.maml.maml_step`):

1. **Speed.** MetaICL, MAML-2-1 and MAML-2-4 (hvp-fd one-sided and first-order), one engine each,
   warmed up, then --repeats rounds with the methods interleaved (order rotated each round).
   Time per processed batch = update time / batches it processed, a batch being one global
   batch of micro-batch x ranks prompts (MetaICL: 1 per update; MAML-2k-n: 2kn); the ratio is
   the median over rounds of MAML's time per batch / MetaICL's in the same round.
2. **Split.** One more update per method with timers around the engine's pieces (wrapped in this
   process only; exclusive times) and, with --profile, torch.profiler's top ops.
3. **Memory.** For n in --memory-tasks: this rank's peak of one meta-update after a warm-up
   (`maml_ds.memory.model.measure_update_peak`: LiveTensorBytes on CPU), the largest over ranks,
   beside the memory model's prediction and the paper's (n+2)*S(theta).
4. Targets (reported, not asserted): second order <= 1.6x MetaICL per batch, first order
   <= 1.05x, memory flat in n.

    deepspeed --num_gpus 2 bench/engine_step.py                      # 2 CPU ranks, tiny GPT-2
    python bench/engine_step.py                                      # 1 process
    deepspeed --num_gpus 2 bench/engine_step.py --model measure-4x256 --repeats 5
    python bench/engine_step.py --json out.json --profile

Not a test. Numbers and the command that produced them: docs/engine-bench.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_ds import distributed as D  # noqa: E402
from maml_ds.config import RunConfig  # noqa: E402
from maml_ds.memory.model import (  # noqa: E402
    MEASURE_BUCKET,
    MEASURE_MODEL,
    MemorySetup,
    build_report,
    measure_fixture,
    measure_update_peak,
    model_facts,
)

SPEED_METHODS = ("metaicl", "maml-2-1", "fomaml-2-1", "maml-2-4", "fomaml-2-4")
TARGETS = {"maml": 1.6, "fomaml": 1.05}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help=f"tiny | tiny-128 | {MEASURE_MODEL}")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default=",".join(SPEED_METHODS))
    p.add_argument("--memory-tasks", default="1,2,4,8", help="n values; empty: skip memory")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops per method")
    p.add_argument(
        "--what-if",
        default="",
        help="comma list of proposed engine changes to measure, patched into this process "
        "only (docs/engine-bench.md): split-gather = one torch.split of the gathered flat "
        "vector instead of one slice per parameter; fast-norm = FD norms without a float64 "
        "copy of every vector",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def shared_work_dir() -> Path:
    """One temporary folder, created by rank 0, known to every rank."""
    holder = [tempfile.mkdtemp(prefix="engine-bench-") if D.is_main() else None]
    if dist.is_initialized() and D.world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def make_fixture(work: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """(data dir, tokenizer dir, model name) for setup; rank 0 writes them."""
    with D.main_first():
        if D.is_main():
            measure_fixture(work / "fixture", args.seed)
    root = work / "fixture"
    model = str(root / "model") if args.model == MEASURE_MODEL else args.model
    return str(root / "data"), str(root / "tokenizer"), model


def bench_config(method: str, args: argparse.Namespace, fixture, out: Path) -> RunConfig:
    data, tokenizer, model = fixture
    cfg = RunConfig(method=method, max_steps=10**6, seed=args.seed, out_dir=str(out))
    cfg.deterministic = False
    cfg.model.name, cfg.model.tokenizer = model, tokenizer
    cfg.data.data_dir = data
    cfg.data.num_demonstrations = 32  # every synthetic prompt fills --seq-len (128)
    cfg.data.max_length = args.seq_len
    cfg.data.max_length_per_example = min(64, args.seq_len)
    cfg.optim.lr = 1e-4
    cfg.meta.inner_lr = 1e-4
    ds = cfg.deepspeed
    ds.zero_stage, ds.precision = args.zero, args.precision
    ds.micro_batch_size = args.micro_batch_size
    ds.reduce_bucket_size = ds.allgather_bucket_size = MEASURE_BUCKET
    return cfg


# --------------------------------------------------------------------------------------------
# Timers around the engine's pieces (this process only)
# --------------------------------------------------------------------------------------------


class Split:
    """Exclusive wall time per label (a label's time excludes nested labelled calls)."""

    def __init__(self) -> None:
        self.active = False
        self.stack: list[list[Any]] = []  # [label, start, nested seconds]
        self.totals: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def region(self, label: str):
        if not self.active:
            yield
            return
        frame = [label, time.perf_counter(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.totals[label] += elapsed - frame[2]
            if self.stack:
                self.stack[-1][2] += elapsed

    def wrap(self, owner: Any, name: str, label: str | Any) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*a, **k):
            text = label(a, k) if callable(label) else label
            if self.stack and self.stack[-1][0] in ("engine.backward", "engine.step"):
                return original(*a, **k)  # DeepSpeed's own autograd calls stay in its label
            with self.region(text):
                return original(*a, **k)

        setattr(owner, name, wrapped)


def install_split(split: Split) -> None:
    import maml_ds.meta.gradient as G
    import maml_ds.training.loop as T
    import maml_ds.training.maml as E

    def gather_label(a, k):
        return "gather params (fwd)" if k.get("differentiable", True) else "gather meta-grad"

    split.wrap(E.PartitionLayout, "gather", gather_label)
    split.wrap(E.PartitionLayout, "global_norm", "FD norms (all-reduce)")
    split.wrap(E.PartitionLayout, "store_moments", "moments in/out")
    split.wrap(E.PartitionLayout, "inner_moments", "moments in/out")
    split.wrap(E.PartitionLayout, "snapshot_moments", "moments in/out")
    split.wrap(E.PartitionLayout, "local_params", "moments in/out")
    split.wrap(E, "_local_batch", "data")
    split.wrap(T, "encode_prompts", "data")
    split.wrap(E, "functional_call", "model forward")
    split.wrap(E, "scored_loss_sum", "loss")
    split.wrap(T, "scored_token_sum", "model forward")
    split.wrap(G, "_grads", "backward (model + gather)")
    split.wrap(torch.autograd, "backward", "backward (model + gather)")
    split.wrap(G, "inner_step", "inner AdamW step")
    split.wrap(G, "inner_precondition", "FD vectors (D, w, axpy)")
    split.wrap(G, "_axpy", "FD vectors (D, w, axpy)")
    split.wrap(G, "reverse_step", "FD vectors (D, w, axpy)")


def wrap_engine(ctx, split: Split) -> None:
    engine = ctx.engine
    for name, label in (("backward", "engine.backward"), ("step", "engine.step")):
        original = getattr(engine, name)

        def wrapped(*a, _original=original, _label=label, **k):
            with split.region(_label):
                return _original(*a, **k)

        setattr(engine, name, wrapped)


# --------------------------------------------------------------------------------------------
# What-if: a proposed engine change, patched into this process only
# --------------------------------------------------------------------------------------------


def install_split_gather() -> None:
    """PartitionLayout.gather with ONE torch.split of the flat vector instead of a slice per
    parameter. The backward of N slices builds N zero-filled full-size gradients and adds them
    up (N x P memory traffic per loss evaluation, 3 full-size buffers alive at the end); the
    backward of one split is one concatenation (P). Same values, same autograd semantics."""
    import math

    import maml_ds.training.maml as E

    original = E.PartitionLayout.gather

    def gather(self, local, *, differentiable: bool = True):
        if any(group.shard_numels is not None for group in self.groups):
            return original(self, local, differentiable=differentiable)  # ZeRO-3 layout
        out = {}
        for key, group in zip(self.keys, self.groups, strict=True):
            part = E._CompactGradient.apply(local[key]) if differentiable else local[key]
            start, size = group.starts[self.rank], group.sizes[self.rank]
            flat = torch.cat(
                [part.new_zeros(start), part, part.new_zeros(group.flat_numel - start - size)]
            )
            if differentiable:
                flat = E._differentiable_sum_over_ranks(flat)
            elif self.world > 1:
                flat = flat.detach().clone()
                dist.all_reduce(flat)
            order = sorted(range(len(group.names)), key=lambda j: group.offsets[j])
            sizes, owners, pos = [], [], 0
            for j in order:
                offset, numel = group.offsets[j], math.prod(group.shapes[j])
                if offset > pos:
                    sizes.append(offset - pos)
                    owners.append(None)
                sizes.append(numel)
                owners.append(j)
                pos = offset + numel
            if pos < flat.numel():
                sizes.append(flat.numel() - pos)
                owners.append(None)
            for j, piece in zip(owners, torch.split(flat, sizes), strict=True):
                if j is not None:
                    name = group.names[j]
                    out[name] = piece.view(group.shapes[j]).to(self.dtype_by_name[name])
        return out

    E.PartitionLayout.gather = gather


def install_fast_norm() -> None:
    """PartitionLayout.global_norm without `.double().pow(2)` copies of the vector: a float32
    vector_norm per tensor (cascade summation), squared and summed in float64, all-reduced."""
    import math

    import maml_ds.training.maml as E

    def global_norm(self, tensors):
        sq = sum(float(torch.linalg.vector_norm(t.detach())) ** 2 for t in tensors.values())
        return math.sqrt(D.all_reduce_sum(sq))

    E.PartitionLayout.global_norm = global_norm


WHAT_IFS = {"split-gather": install_split_gather, "fast-norm": install_fast_norm}


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def batches_of(stats, ctx) -> float:
    """Global batches (micro-batch x ranks prompts) processed by one update."""
    return stats.num_prompts / (ctx.cfg.deepspeed.micro_batch_size * D.world_size())


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_update(step, ctx) -> tuple[float, float]:
    _sync()
    D.barrier()
    start = time.perf_counter()
    stats = step(ctx)
    _sync()
    D.barrier()
    seconds = D.all_reduce_sum(time.perf_counter() - start) / D.world_size()
    return seconds, batches_of(stats, ctx)


def speed(methods, contexts, args) -> dict[str, Any]:
    from maml_ds.training.loop import step_function

    steps = {m: step_function(contexts[m]) for m in methods}
    for _ in range(args.warmup):
        for m in methods:
            steps[m](contexts[m])
    per_batch: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            seconds, batches = timed_update(steps[m], contexts[m])
            per_batch[m].append(seconds / batches)
    base = per_batch["metaicl"]
    out = {}
    for m in methods:
        ratios = [a / b for a, b in zip(per_batch[m], base, strict=True)]
        out[m] = {
            "median_seconds_per_batch": statistics.median(per_batch[m]),
            "seconds_per_batch": per_batch[m],
            "ratio_vs_metaicl": statistics.median(ratios),
            "ratios": ratios,
        }
    return out


def split_times(methods, contexts, split: Split) -> dict[str, dict[str, float]]:
    from maml_ds.training.loop import step_function

    out = {}
    for m in methods:
        ctx = contexts[m]
        step = step_function(ctx)
        split.totals.clear()
        split.active = True
        D.barrier()
        start = time.perf_counter()
        stats = step(ctx)
        total = time.perf_counter() - start
        split.active = False
        batches = batches_of(stats, ctx)
        row = {label: seconds / batches for label, seconds in split.totals.items()}
        row["other (python, DeepSpeed hooks, sampler)"] = (total - sum(split.totals.values())) / (
            batches
        )
        row["total"] = total / batches
        out[m] = row
    return out


def profile_ops(methods, contexts, top: int = 12) -> dict[str, list[tuple[str, float, int]]]:
    from torch.profiler import ProfilerActivity, profile

    from maml_ds.training.loop import step_function

    out = {}
    for m in methods:
        ctx = contexts[m]
        step = step_function(ctx)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stats = step(ctx)
        batches = batches_of(stats, ctx)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        out[m] = [(e.key, e.self_cpu_time_total / 1e3 / batches, e.count) for e in events]
    return out


def memory(args, fixture, work: Path) -> list[dict[str, Any]]:
    tasks = [int(v) for v in args.memory_tasks.split(",") if v.strip()]
    if not tasks:
        return []
    tok_vocab = None
    if args.model != MEASURE_MODEL:
        from maml_ds.models import load_tokenizer

        tok_vocab = len(load_tokenizer(fixture[1]))
    facts = model_facts(args.model, vocab_size=tok_vocab)
    rows = []
    for prefix in ("maml", "fomaml"):
        for n in tasks:
            method = f"{prefix}-2-{n}"
            cfg = bench_config(method, args, fixture, work / f"mem-{method}")
            peak = measure_update_peak(cfg)
            peaks = [None] * D.world_size()
            if dist.is_initialized() and D.world_size() > 1:
                dist.all_gather_object(peaks, peak)
            else:
                peaks = [peak]
            setup = MemorySetup(
                method=method, zero_stage=args.zero, precision=args.precision,
                gpus_per_node=D.world_size(), seq_len=args.seq_len,
                micro_batch_size=args.micro_batch_size, reduce_bucket_size=MEASURE_BUCKET,
            )  # fmt: skip
            report = build_report(facts, setup)
            rows.append(
                {
                    "method": method,
                    "num_tasks": n,
                    "measured_peak_bytes_per_rank": peaks,
                    "measured_peak_bytes": max(peaks),
                    "predicted_peak_bytes": report.predicted_peak_bytes,
                    "predicted_peak_phase": report.peak_phase,
                    "paper_bytes": report.paper_bytes,
                    "s_theta_bytes": report.s_theta_bytes,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    cfg = result["config"]
    console.print(
        f"[bold]engine bench[/]: {cfg['model']} ({cfg['num_params']:,} parameters), "
        f"{cfg['world_size']} rank(s), ZeRO-{cfg['zero']}, {cfg['precision']}, seq "
        f"{cfg['seq_len']} x micro-batch {cfg['micro_batch_size']}, {cfg['repeats']} rounds, "
        f"torch {cfg['torch']} threads {cfg['threads']}"
        + (f", WHAT-IF {cfg['what_if']} (patched engine)" if cfg.get("what_if") else ""),
        highlight=False,
    )
    if result.get("speed"):
        table = Table(title="time per processed batch vs MetaICL (median over rounds)")
        for col in ("method", "ms / batch", "x MetaICL", "target", "met", "ratio range"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m, row in result["speed"].items():
            kind = m.split("-")[0]
            target = TARGETS.get(kind)
            met = "" if target is None else ("yes" if row["ratio_vs_metaicl"] <= target else "NO")
            table.add_row(
                m
                + (" (hvp-fd)" if kind == "maml" else " (first-order)" if kind == "fomaml" else ""),
                f"{1e3 * row['median_seconds_per_batch']:.1f}",
                f"{row['ratio_vs_metaicl']:.2f}",
                "" if target is None else f"<= {target}",
                met,
                f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f}",
            )
        console.print(table)
    if result.get("split"):
        labels = sorted({k for row in result["split"].values() for k in row if k != "total"})
        table = Table(title="where the time goes (ms per batch, one update, exclusive timers)")
        table.add_column("part")
        methods = list(result["split"])
        for m in methods:
            table.add_column(m, justify="right")
        for label in labels:
            table.add_row(
                label, *(f"{1e3 * result['split'][m].get(label, 0.0):.1f}" for m in methods)
            )
        table.add_section()
        table.add_row("total", *(f"{1e3 * result['split'][m]['total']:.1f}" for m in methods))
        console.print(table)
    for m, ops in (result.get("profile") or {}).items():
        table = Table(title=f"torch.profiler top ops, {m} (self CPU ms per batch)")
        for col in ("op", "ms / batch", "calls"):
            table.add_column(col, justify="left" if col == "op" else "right")
        for key, ms, count in ops:
            table.add_row(key, f"{ms:.2f}", str(count))
        console.print(table)
    if result.get("memory"):
        table = Table(title="peak memory per rank of one meta-update (MB = 1e6 bytes)")
        for col in ("method", "n", "measured", "predicted", "ratio", "paper (n+2)S", "phase"):
            table.add_column(col, justify="left" if col in ("method", "phase") else "right")
        for row in result["memory"]:
            table.add_row(
                row["method"],
                str(row["num_tasks"]),
                f"{row['measured_peak_bytes'] / 1e6:.2f}",
                f"{row['predicted_peak_bytes'] / 1e6:.2f}",
                f"{row['measured_peak_bytes'] / row['predicted_peak_bytes']:.3f}",
                f"{row['paper_bytes'] / 1e6:.2f}",
                row["predicted_peak_phase"],
            )
        console.print(table)
        s = result["memory"][0]["s_theta_bytes"]
        console.print(f"S(theta) = {s / 1e6:.2f} MB in {cfg['precision']}", highlight=False)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    D.init_distributed()
    what_ifs = [w.strip() for w in args.what_if.split(",") if w.strip()]
    for name in what_ifs:
        if name not in WHAT_IFS:
            raise SystemExit(f"--what-if {name}: unknown; known: {', '.join(WHAT_IFS)}")
        WHAT_IFS[name]()
    work = shared_work_dir()
    fixture = make_fixture(work, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "metaicl" not in methods:
        methods.insert(0, "metaicl")
    from maml_ds.training.loop import setup

    contexts = {}
    for m in methods:
        contexts[m] = setup(bench_config(m, args, fixture, work / f"speed-{m}"))
    module = contexts["metaicl"].engine.module
    result: dict[str, Any] = {
        "config": {
            "model": args.model,
            "num_params": sum(p.numel() for p in module.parameters()),
            "world_size": D.world_size(),
            "zero": args.zero,
            "precision": args.precision,
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "what_if": ",".join(what_ifs),
            "argv": sys.argv,
        }
    }
    result["speed"] = speed(methods, contexts, args)
    split = Split()  # timers go in after the speed rounds, which run the code untouched
    install_split(split)
    for ctx in contexts.values():
        wrap_engine(ctx, split)
    result["split"] = split_times(methods, contexts, split)
    if args.profile:
        result["profile"] = profile_ops(methods, contexts)
    contexts.clear()
    gc.collect()
    result["memory"] = memory(args, fixture, work)
    if D.is_main():
        print_report(result)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
    D.shutdown()


if __name__ == "__main__":
    main()
