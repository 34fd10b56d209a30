#!/usr/bin/env python
"""One prepared GPU check (a few minutes): step time and peak memory vs the memory model.

Runs MetaICL, MAML-2-1 and MAML-2-4 on a random-init GPT-2 Medium (seq 1024, micro-batch 1, bf16
where the GPU has it, else fp16; ZeRO-2: the engine refuses MAML at ZeRO-0 with 16 bits) for a
few updates each on ONE GPU, through the training code itself (`maml_ds.training.setup` + the
step function, `maml_ds.memory.measure_updates`) on a synthetic suite whose prompts fill
--seq-len. Records per-update wall time and torch.cuda.max_memory_allocated beside the memory
model's predicted per-GPU peak and the paper's formula; a refused or failing method is recorded
in its row and the others still run. Writes JSON, one row per method. docs/memory.md. `--llama`:
a ~1.1B random-init Llama-style model (`random:llama-1b`) at ZeRO-3 through the sharded path
(MetaICL, MAML-2-4, FOMAML-2-4; activation checkpointing, SDPA).

    python scripts/gpu_check.py --out gpu_check.json            # on a GPU machine
    python scripts/gpu_check.py --llama --out llama_check.json  # the sharded path, ~1B Llama
    python scripts/gpu_check.py --llama --adapted-rounding stochastic --methods maml-2-4,maml-4-2
    python scripts/gpu_check.py --model tiny --seq-len 64 --steps 2 --out /tmp/c.json  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_ds import distributed as D  # noqa: E402
from maml_ds.memory import (  # noqa: E402
    MeasureFixture,
    MemorySetup,
    engine_refusal,
    measure_run_config,
    measure_updates,
    memory_report,
)
from maml_ds.models import load_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    p.add_argument("--model", default="random:gpt2-medium", help="a built-in (maml_ds.models)")
    p.add_argument("--methods", default="metaicl,maml-2-1,maml-2-4")
    p.add_argument("--steps", type=int, default=3, help="measured updates per method")
    p.add_argument("--warmup", type=int, default=1, help="updates before measuring starts")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default=None, help="default: bf16 if supported, else fp16")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--second-order", default="hvp-fd")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--adapted-rounding", default="nearest", choices=["nearest", "stochastic"],
        help="MAML at 16 bits: how the adapted point is rounded (RunConfig.meta)",
    )  # fmt: skip
    p.add_argument(
        "--llama", action="store_true",
        help="random:llama-1b, ZeRO-3 (the sharded path), metaicl,maml-2-4,fomaml-2-4,maml-4-2 "
        "(k = 2: a support gradient kept in pinned host memory), activation checkpointing, sdpa",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if args.llama:
        args.model, args.zero, args.attn = "random:llama-1b", 3, "sdpa"
        args.methods = "metaicl,maml-2-4,fomaml-2-4,maml-4-2"
        args.activation_checkpointing = True
    return args


def run_method(
    method: str, args: argparse.Namespace, precision: str, fixture: MeasureFixture, work: Path
) -> dict[str, Any]:
    setup = MemorySetup(
        method=method,
        zero_stage=args.zero,
        precision=precision,  # type: ignore[arg-type]
        gpus_per_node=D.world_size(),
        seq_len=args.seq_len,
        second_order=args.second_order,
        attn_implementation=args.attn,
        activation_checkpointing=args.activation_checkpointing,
    )
    vocab = len(load_tokenizer(fixture.tokenizer_dir))
    predicted = memory_report(args.model, setup, vocab_size=vocab)
    row: dict[str, Any] = {
        "method": method,
        "zero_stage": args.zero,
        "precision": precision,
        "world_size": D.world_size(),
        "seq_len": args.seq_len,
        "micro_batch_size": setup.micro_batch_size,
        "attn": args.attn,
        "activation_checkpointing": args.activation_checkpointing,
        "adapted_rounding": args.adapted_rounding,
        "second_order": setup.effective_second_order,
        "num_params": predicted.model.num_params,
        "predicted_peak_bytes": predicted.predicted_peak_bytes,
        "predicted_peak_phase": predicted.peak_phase,
        "predicted_phase_bytes": predicted.phase_bytes,
        "paper_formula": predicted.paper_formula,
        "paper_bytes": predicted.paper_bytes,
    }
    refusal = engine_refusal(setup)
    if refusal is not None:
        row["error"] = f"refused by maml_ds.training.maml at start-up: {refusal}"
        return row
    cfg = measure_run_config(setup, fixture, work / method, model=args.model, seed=args.seed)
    cfg.max_steps = args.warmup + args.steps
    cfg.meta.adapted_rounding = args.adapted_rounding
    try:
        m = measure_updates(cfg, num_warmup=args.warmup, num_steps=args.steps)
    except Exception as err:  # one failing method must not lose the others' numbers
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc()[-4000:]
        return row
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row.update(
        setup_seconds=m.setup_seconds,
        step_seconds=m.step_seconds,
        median_step_seconds=statistics.median(m.step_seconds),
        measured_peak_bytes=m.peak_bytes,
        ratio=m.peak_bytes / predicted.predicted_peak_bytes,
        counter=m.counter,
    )
    if m.reserved_peak_bytes is not None:
        row["max_memory_reserved_bytes"] = m.reserved_peak_bytes
    return row


def main() -> None:
    args = parse_args()
    D.init_distributed()
    on_gpu = D.device().type == "cuda"
    precision = args.precision or (
        ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    )
    import deepspeed
    import transformers

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "model": args.model,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        fixture = MeasureFixture(work / "fixture", args.seq_len).write(args.seed)
        for method in args.methods.split(","):
            print(f"[gpu_check] {method} ...", flush=True)
            row = run_method(method.strip(), args, precision, fixture, work)
            result["rows"].append(row)
            keys = (
                "median_step_seconds",
                "measured_peak_bytes",
                "predicted_peak_bytes",
                "ratio",
                "paper_bytes",
                "error",
            )
            summary = {k: row.get(k) for k in keys}
            print(f"[gpu_check] {method}: {json.dumps(summary)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[gpu_check] wrote {args.out}")
    D.shutdown()


if __name__ == "__main__":
    main()
