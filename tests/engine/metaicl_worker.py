"""Run one MetaICL update per ZeRO stage and save the resulting full parameters.

Started by tests/engine/test_metaicl.py as one process or under `deepspeed --num_gpus 2`.
Usage: python metaicl_worker.py DATA TOKENIZER OUT MICRO_BATCH STAGE [STAGE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.training import fit, setup


def full_parameters(engine, stage: int) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    data, tokenizer, out, micro = argv[0], argv[1], Path(argv[2]), int(argv[3])
    for stage in map(int, argv[4:]):
        cfg = RunConfig(method="metaicl", max_steps=2, seed=5)
        cfg.out_dir = str(out / f"zero{stage}-w{micro}")
        cfg.model.tokenizer = tokenizer
        cfg.data.data_dir = data
        cfg.data.num_demonstrations = 4
        cfg.optim.lr = 1e-4  # Adam's first step moves every weight by ~lr
        cfg.deepspeed.zero_stage = stage
        cfg.deepspeed.micro_batch_size = micro
        cfg.deepspeed.reduce_bucket_size = 100_000
        cfg.deepspeed.allgather_bucket_size = 100_000
        ctx = setup(cfg)
        init = full_parameters(ctx.engine, stage)
        history = fit(ctx, stop_after=1)
        state = full_parameters(ctx.engine, stage)
        if D.is_main():
            torch.save(
                {"init": init, "params": state, "loss": history[-1]["loss"]},
                out / f"zero{stage}-w{micro}.pt",
            )
    D.shutdown()


if __name__ == "__main__":
    main()
