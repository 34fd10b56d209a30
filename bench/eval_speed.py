"""Speed of evaluation scoring: KV-cached demonstration prefix vs plain full-sequence scoring.

Scores every test task of the default synthetic suite at every seed, direct and channel, with a
random-init model and both paths in one process: wall time, tokens through the model, and
whether both give the same predictions. Not a test: its table is in docs/evaluation.md.

    OMP_NUM_THREADS=1 python bench/eval_speed.py                 # the table in docs/evaluation.md
    python bench/eval_speed.py --model tiny-128 --seeds 100 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from maml_ds.data.prompts import PromptFormat
from maml_ds.data.reader import TEST_SEEDS, load_target_examples
from maml_ds.data.synth import write_synthetic_suite
from maml_ds.data.tasks import load_setting
from maml_ds.eval import ScoringStats, argmin_first, score_examples
from maml_ds.models import build_model, iter_data_texts, train_bpe_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="built-in config (tiny, tiny-128, ...)")
    parser.add_argument("--seeds", default=",".join(map(str, TEST_SEEDS)))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings per path")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "synthetic"
        write_synthetic_suite(data_dir, seed=0)
        tokenizer = train_bpe_tokenizer(iter_data_texts(data_dir))
        model = build_model(args.model, vocab_size=len(tokenizer), attn_implementation="sdpa")
        model.to(args.device).eval()
        setting = load_setting("synthetic", data_dir)
        jobs = [
            (task, seed, *load_target_examples(data_dir, task, seed=seed))
            for task in setting.test
            for seed in seeds
        ]

        rows = []
        for variant in ("direct", "channel"):
            fmt = PromptFormat(method=variant)
            # warm-up (allocator, kernels) on one job, both paths
            for use_kv_cache in (True, False):
                score_examples(
                    model, tokenizer, jobs[0][2], jobs[0][3][:4], fmt, use_kv_cache=use_kv_cache
                )
            results = {}
            for use_kv_cache in (False, True):
                best = None
                for _ in range(args.repeats):
                    stats = ScoringStats()
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    losses = [
                        score_examples(
                            model,
                            tokenizer,
                            demos,
                            tests,
                            fmt,
                            batch_size=args.batch_size,
                            use_kv_cache=use_kv_cache,
                            stats=stats,
                        )
                        for _, _, demos, tests in jobs
                    ]
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - started
                    if best is None or seconds < best[0]:
                        best = (seconds, stats, losses)
                results[use_kv_cache] = best
            (t_full, s_full, l_full), (t_kv, s_kv, l_kv) = results[False], results[True]
            same = all(
                argmin_first(a) == argmin_first(b)
                for job_a, job_b in zip(l_full, l_kv, strict=True)
                for a, b in zip(job_a, job_b, strict=True)
            )
            max_diff = max(
                abs(x - y)
                for job_a, job_b in zip(l_full, l_kv, strict=True)
                for a, b in zip(job_a, job_b, strict=True)
                for x, y in zip(a, b, strict=True)
            )
            rows.append(
                {
                    "variant": variant,
                    "sequences": s_full.num_sequences,
                    "full_seconds": t_full,
                    "kv_seconds": t_kv,
                    "speedup": t_full / t_kv,
                    "full_tokens": s_full.num_forward_tokens,
                    "kv_tokens": s_kv.num_forward_tokens,
                    "full_real_tokens": s_full.num_real_tokens,
                    "kv_real_tokens": s_kv.num_real_tokens,
                    "prefix_passes": s_kv.num_prefix_passes,
                    "same_predictions": same,
                    "max_loss_diff": max_diff,
                }
            )

    table = Table(
        title=(
            f"eval scoring, synthetic suite (defaults), {len(setting.test)} tasks x "
            f"{len(seeds)} seeds, model {args.model}, batch {args.batch_size}, {args.device}, "
            f"torch threads {torch.get_num_threads()}"
        )
    )
    for name in (
        "variant",
        "sequences",
        "full s",
        "kv-cache s",
        "speed-up",
        "full tokens",
        "kv tokens (real)",
        "prefix passes",
        "same preds",
        "max |dloss|",
    ):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            r["variant"],
            str(r["sequences"]),
            f"{r['full_seconds']:.2f}",
            f"{r['kv_seconds']:.2f}",
            f"{r['speedup']:.1f}x",
            f"{r['full_tokens']:,} ({r['full_real_tokens']:,})",
            f"{r['kv_tokens']:,} ({r['kv_real_tokens']:,})",
            str(r["prefix_passes"]),
            str(r["same_predictions"]),
            f"{r['max_loss_diff']:.1e}",
        )
    Console(width=220).print(table)
    print(
        "\n| variant | sequences | full s | kv-cache s | speed-up | full tokens (real) | "
        "kv tokens (real) | prefix passes | same predictions | max abs loss diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['sequences']} | {r['full_seconds']:.2f} | "
            f"{r['kv_seconds']:.2f} | {r['speedup']:.1f}x | {r['full_tokens']:,} "
            f"({r['full_real_tokens']:,}) | {r['kv_tokens']:,} ({r['kv_real_tokens']:,}) | "
            f"{r['prefix_passes']} | {r['same_predictions']} | {r['max_loss_diff']:.1e} |"
        )
    if args.json is not None:
        record = {
            "args": vars(args) | {"json": str(args.json)},
            "rows": rows,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
