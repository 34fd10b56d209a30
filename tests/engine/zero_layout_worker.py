"""Per ZeRO stage, one rank: check the DeepSpeed internals `zero_layout` reads, and use them.

Started by tests/engine/test_zero_layout.py as one process.
Usage: python zero_layout_worker.py DATA TOKENIZER OUT STAGE [STAGE ...]
Writes OUT/zeroS.json: the internals' problems, and what the layout and the checkpoint readers
gave against the engine's own parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.training import CHECKPOINTS, save_checkpoint, setup, step_function
from maml_ds.training import zero_layout as Z
from maml_ds.training.loop import write_monitor_events


def module_parameters(engine, stage: int) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in b)


def check_stage(data: str, tokenizer: str, out: Path, stage: int) -> dict:
    cfg = RunConfig(method="maml-2-2", max_steps=1, seed=3)
    cfg.out_dir = str(out / f"zero{stage}")
    cfg.model.tokenizer = tokenizer
    cfg.data.data_dir = data
    cfg.data.num_demonstrations = 4
    cfg.deepspeed.zero_stage = stage
    cfg.deepspeed.reduce_bucket_size = cfg.deepspeed.allgather_bucket_size = 20_000
    ctx = setup(cfg)
    result: dict = {"problems": Z.internals_problems(ctx.engine, stage)}
    if result["problems"]:
        return result
    layout = Z.PartitionLayout(ctx.engine, stage)
    full = module_parameters(ctx.engine, stage)
    gathered = layout.gather(layout.local_params(), differentiable=False)
    result["gather_names"] = sorted(gathered) == sorted(full)
    result["gather_max_difference"] = max_difference(gathered, full)
    step_function(ctx)(ctx)
    # The shared moments are keyed by exactly the tensors the layout names as their owners.
    owners = {id(t) for t in layout.state_owners()}
    result["state_keyed_by_owners"] = {id(t) for t in layout.opt.state} == owners
    write_monitor_events(ctx.engine, 1, {"loss": 1.0})
    ctx.state.step = 1
    tag_dir = save_checkpoint(ctx)
    full = module_parameters(ctx.engine, stage)
    weights = Z.checkpoint_state_dict(out / f"zero{stage}" / CHECKPOINTS, tag_dir.name)
    result["is_checkpoint_tag"] = Z.is_checkpoint_tag(tag_dir)
    result["checkpoint_max_difference"] = max_difference(weights, full)
    client = Z.checkpoint_client_state(tag_dir) or {}
    result["client_config"] = client.get("config") == cfg.to_dict()
    return result


def main() -> None:
    data, tokenizer, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    for stage in map(int, sys.argv[4:]):
        result = check_stage(data, tokenizer, out, stage)
        (out / f"zero{stage}.json").write_text(json.dumps(result))
    D.shutdown()


if __name__ == "__main__":
    main()
