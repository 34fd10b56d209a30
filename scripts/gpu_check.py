#!/usr/bin/env python
"""One prepared GPU check (a few minutes): step time and peak memory vs the memory model.

Runs MetaICL, MAML-2-1 and MAML-2-4 on a random-init GPT-2 Medium config (seq 1024, micro-batch
1, bf16 where the GPU has it, else fp16; ZeRO-2: the engine refuses MAML at ZeRO-0 with 16-bit
precision) for a few steps each, on ONE GPU through deepspeed.initialize, and records per-step
wall time and torch.cuda.max_memory_allocated beside `maml_ds.memory.model`'s predicted per-GPU peak
(and the paper's formula) for the same setup. Writes JSON, one row per method.

    python scripts/gpu_check.py --out gpu_check.json            # on a GPU machine
    python scripts/gpu_check.py --model tiny --vocab-size 512 --seq-len 64 --steps 2 \
        --out /tmp/c.json                                        # CPU smoke test (LiveTensorBytes)

The MAML rows go through maml_ds.training.maml.maml_step with random token batches fed in place of the
prompt sampler (maml_ds.training.maml._local_batch is replaced for this process); what the engine
refuses at start-up (maml_ds.config.engine_problems) or fails on is recorded in that row, and
the other rows still run. The loss scores every token (maml_ds.memory.model.all_token_loss for
MetaICL; all-ones scored masks for MAML), the memory model's assumption.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_ds import distributed as D  # noqa: E402
from maml_ds.config import RunConfig, build_deepspeed_config  # noqa: E402
from maml_ds.memory.model import (  # noqa: E402
    MemorySetup,
    all_token_loss,
    engine_refusal,
    memory_report,
)

MODEL_FOR_REPORT = {"random:gpt2-medium": "gpt2-medium", "random:gpt2": "gpt2"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    p.add_argument("--model", default="random:gpt2-medium")
    p.add_argument("--vocab-size", type=int, default=None, help="for the tiny built-ins")
    p.add_argument("--methods", default="metaicl,maml-2-1,maml-2-4")
    p.add_argument("--steps", type=int, default=3, help="measured steps per method")
    p.add_argument("--warmup", type=int, default=1, help="steps before timing starts")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default=None, help="default: bf16 if supported, else fp16")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--second-order", default="hvp-fd")
    return p.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])


class RandomTasks:
    """Stands in for the prompt sampler: maml_step asks it for batches, we hand out indices."""

    def take(self, num_batches: int, batch_size: int) -> list[int]:
        return list(range(num_batches))


def random_batch(vocab: int, seq_len: int, micro: int, device: torch.device) -> dict[str, Any]:
    ids = torch.randint(0, vocab, (micro, seq_len), device=device)
    ones = torch.ones_like(ids)
    return {
        "input_ids": ids,
        "attention_mask": ones,
        "scored_mask": ones,
        "num_tokens": micro * (seq_len - 1) * D.world_size(),
    }


def sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def run_method(method: str, args: argparse.Namespace, precision: str, on_gpu: bool) -> dict:
    import deepspeed

    from maml_ds.models import build_model
    from maml_ds.training.loop import build_optimizer

    cfg = RunConfig(method=method, max_steps=args.warmup + args.steps, out_dir="/tmp/gpu_check")
    cfg.model.name, cfg.model.attn_implementation = args.model, args.attn
    cfg.meta.second_order = args.second_order
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = args.zero, precision
    cfg.data.max_length = args.seq_len
    cfg.data.max_length_per_example = min(cfg.data.max_length_per_example, args.seq_len)
    cfg.validate()
    device = D.device()
    report_name = MODEL_FOR_REPORT.get(args.model, args.model)
    setup = MemorySetup(
        method=method,
        zero_stage=args.zero,
        precision=precision,
        gpus_per_node=D.world_size(),
        seq_len=args.seq_len,
        second_order=args.second_order,
        attn_implementation=args.attn,
        reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
    )
    predicted = memory_report(report_name, setup, vocab_size=args.vocab_size)
    row: dict[str, Any] = {
        "method": method,
        "zero_stage": args.zero,
        "precision": precision,
        "world_size": D.world_size(),
        "seq_len": args.seq_len,
        "micro_batch_size": 1,
        "attn": args.attn,
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
    gc.collect()
    counter = None
    if on_gpu:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    else:
        from maml_ds.meta.live_bytes import LiveTensorBytes

        base = 0
        counter = LiveTensorBytes().__enter__()
    try:
        started = time.perf_counter()
        model = build_model(
            args.model,
            vocab_size=args.vocab_size,
            seed=cfg.seed,
            attn_implementation=args.attn,
            dropout=0.0,
        )
        vocab = model.config.vocab_size
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(cfg, model),
            config=build_deepspeed_config(cfg, D.world_size()),
        )
        if method == "metaicl":
            batch = random_batch(vocab, args.seq_len, 1, device)

            def step() -> None:
                logits = engine(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                loss = all_token_loss(logits, batch["input_ids"])
                del logits
                engine.backward(loss)
                engine.step()
        else:
            import maml_ds.training.maml as maml_engine

            maml_engine._local_batch = lambda ctx, _: random_batch(vocab, args.seq_len, 1, device)
            ctx = SimpleNamespace(cfg=cfg, engine=engine, sampler=RandomTasks(), layout=None)

            def step() -> None:
                maml_engine.maml_step(ctx)

        sync(on_gpu)
        row["setup_seconds"] = time.perf_counter() - started
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup:  # the peak of steady steps; initialisation transients excluded
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                else:
                    counter.reset_peak()
            sync(on_gpu)
            start = time.perf_counter()
            step()
            sync(on_gpu)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) if on_gpu else counter.peak_bytes
        if on_gpu:
            row["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row.update(
            step_seconds=times,
            median_step_seconds=statistics.median(times),
            measured_peak_bytes=int(peak),
            ratio=peak / predicted.predicted_peak_bytes,
            counter="torch.cuda.max_memory_allocated" if on_gpu else "LiveTensorBytes",
        )
        engine = model = ctx = step = None  # free before the next method
    except Exception as err:  # one failing method must not lose the others' numbers
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
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
    for method in args.methods.split(","):
        print(f"[gpu_check] {method} ...", flush=True)
        row = run_method(method.strip(), args, precision, on_gpu)
        result["rows"].append(row)
        summary = {
            k: row.get(k)
            for k in (
                "median_step_seconds",
                "measured_peak_bytes",
                "predicted_peak_bytes",
                "ratio",
                "paper_bytes",
                "error",
            )
        }
        print(f"[gpu_check] {method}: {json.dumps(summary)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[gpu_check] wrote {args.out}")
    D.shutdown()


if __name__ == "__main__":
    main()
