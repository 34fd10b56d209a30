"""MAML-en-LLM through the DeepSpeed engine vs MetaICL: time per batch, where it goes, memory vs n.

One run, one config: a model trained by `maml_ds.training.setup` on a synthetic suite (prompts
of exactly --seq-len tokens), DeepSpeed at --zero / --precision, buckets of 2e5 elements, this
process's ranks. Four parts, all through `setup` + the real step functions (`step_function`):

1. **Speed.** MetaICL, MAML-2-1 and MAML-2-4 (hvp-fd one-sided and first-order), one engine each,
   warmed up, then --repeats rounds with the methods interleaved (order rotated each round).
   Time per processed batch = update time / batches it processed, a batch being one global
   batch of micro-batch x ranks prompts (MetaICL: 1 per update; MAML-2k-n: 2kn); the ratio is
   the median over rounds of MAML's time per batch / MetaICL's in the same round.
2. **Split.** One more update per method with timers around the engine's pieces (wrapped in this
   process only; exclusive times) and, with --profile, torch.profiler's top ops.
3. **Memory.** For n in --memory-tasks: this rank's peak of one meta-update after a warm-up
   (`maml_ds.memory.measure_update_peak`: LiveTensorBytes on CPU), the largest over ranks,
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
from maml_ds.memory import (  # noqa: E402
    MEASURE_BUCKET,
    MEASURE_MODEL,
    MeasureFixture,
    MemorySetup,
    build_report,
    measure_run_config,
    measure_update_peak,
    model_facts,
)
from maml_ds.training import setup, step_function  # noqa: E402

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
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-support-gradients", type=int, default=None,
        help="hvp-fd, k >= 2: support gradients kept (RunConfig.meta; default k - 1)",
    )  # fmt: skip
    p.add_argument(
        "--gather", action="store_true",
        help="ZeRO-3 MAML through the gather path (the reference) instead of the sharded one",
    )  # fmt: skip
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


def make_fixture(work: Path, args: argparse.Namespace) -> MeasureFixture:
    """The synthetic suite and tokenizer that setup reads; rank 0 writes them."""
    fixture = MeasureFixture(work / "fixture", args.seq_len)
    with D.main_first():
        if D.is_main():
            fixture.write(args.seed)
    return fixture


def bench_config(method: str, args: argparse.Namespace, fixture, out: Path) -> RunConfig:
    setup = MemorySetup(
        method=method, zero_stage=args.zero, precision=args.precision, seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size, reduce_bucket_size=MEASURE_BUCKET,
        keep_support_gradients=args.keep_support_gradients,
    )  # fmt: skip
    cfg = measure_run_config(setup, fixture, out, model=args.model, seed=args.seed)
    cfg.max_steps = 10**6
    cfg.optim.lr = 1e-4
    cfg.meta.inner_lr = 1e-4
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
    import maml_ds.training.maml as maml
    import maml_ds.training.metaicl as metaicl
    from maml_ds.training.zero_layout import PartitionLayout

    def gather_label(a, k):
        return "gather params (fwd)" if k.get("differentiable", True) else "gather meta-grad"

    split.wrap(PartitionLayout, "gather", gather_label)
    split.wrap(PartitionLayout, "global_norm", "FD norms (all-reduce)")
    split.wrap(PartitionLayout, "store_moments", "moments in/out")
    split.wrap(PartitionLayout, "inner_moments", "moments in/out")
    split.wrap(PartitionLayout, "snapshot_moments", "moments in/out")
    split.wrap(PartitionLayout, "local_params", "moments in/out")
    split.wrap(maml.MamlStep, "local_batch", "data")
    split.wrap(metaicl, "encode_prompts", "data")
    split.wrap(maml, "functional_call", "model forward")
    split.wrap(maml, "scored_loss_sum", "loss")
    split.wrap(metaicl, "scored_token_sum", "model forward")
    split.wrap(G, "_grads", "backward (model + gather)")
    split.wrap(torch.autograd, "backward", "backward (model + gather)")
    split.wrap(G, "inner_step", "inner AdamW step")
    split.wrap(G, "preconditioned_direction", "FD vectors (D, w, axpy)")
    split.wrap(G, "_axpy", "FD vectors (D, w, axpy)")
    split.wrap(G, "_adjoint_update", "FD vectors (D, w, axpy)")


def wrap_engine(ctx, split: Split) -> None:
    engine = ctx.engine
    for name, label in (("backward", "engine.backward"), ("step", "engine.step")):
        original = getattr(engine, name)

        def wrapped(*a, _original=original, _label=label, **k):
            with split.region(_label):
                return _original(*a, **k)

        setattr(engine, name, wrapped)


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


def make_step(ctx, gather: bool):
    """The run's step function; with `gather`, a MAML step on the gather path."""
    if gather and ctx.cfg.method_spec.kind == "maml":
        from maml_ds.training.maml import MamlStep

        return MamlStep(ctx, sharded=False)
    return step_function(ctx)


def speed(methods, contexts, args) -> dict[str, Any]:
    steps = {m: make_step(contexts[m], args.gather) for m in methods}
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


def split_times(methods, contexts, split: Split, gather: bool) -> dict[str, dict[str, float]]:
    out = {}
    for m in methods:
        ctx = contexts[m]
        step = make_step(ctx, gather)
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
    from maml_ds.models import load_tokenizer

    tok_vocab = len(load_tokenizer(fixture.tokenizer_dir))
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
                keep_support_gradients=args.keep_support_gradients,
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
        f"torch {cfg['torch']} threads {cfg['threads']}",
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
    work = shared_work_dir()
    fixture = make_fixture(work, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "metaicl" not in methods:
        methods.insert(0, "metaicl")
    contexts = {}
    for m in methods:
        contexts[m] = setup(bench_config(m, args, fixture, work / f"speed-{m}"))
    module = contexts["metaicl"].engine.module
    result: dict[str, Any] = {
        "config": {
            "model": args.model,
            # ZeRO-3 leaves empty local tensors: the full size is ds_numel
            "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
            "world_size": D.world_size(),
            "zero": args.zero,
            "precision": args.precision,
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "repeats": args.repeats,
            "maml_path": "gather" if args.gather else "default (sharded at ZeRO-3)",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "argv": sys.argv,
        }
    }
    result["speed"] = speed(methods, contexts, args)
    split = Split()  # timers go in after the speed rounds, which run the code untouched
    install_split(split)
    for ctx in contexts.values():
        wrap_engine(ctx, split)
    result["split"] = split_times(methods, contexts, split, args.gather)
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
