"""Non-finite updates, one rank, per case: one good update, then faulty ones that must be skipped.

Started by tests/engine/test_nonfinite.py as one process.
Usage: python nonfinite_worker.py DATA TOKENIZER OUT CASE [CASE ...]
with CASE = METHOD-zeroSTAGE-FAULT, FAULT `lr` (lr 1e10: the first update is applied and makes
every later loss non-finite) or `grad` (finite losses, a NaN gradient from the second update on).
Writes OUT/CASE.json: what the skipped update left, the history, and the M-consecutive stop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.training import CHECKPOINTS, fit, setup
from maml_ds.training import checkpoint as C
from maml_ds.training.loop import HISTORY_FILE
from maml_ds.training.stop import NonFiniteStop
from maml_ds.training.zero_layout import checkpoint_state_dict, snapshot_optimizer_state

STOP_AFTER = 2  # the M of the consecutive-skips stop in this worker


def case_config(data: str, tokenizer: str, out: Path, case: str) -> RunConfig:
    method, stage, fault = case.rsplit("-", 2)
    cfg = RunConfig(method=method, max_steps=20, seed=7)
    cfg.out_dir = str(out / case)
    cfg.model.tokenizer = tokenizer
    cfg.data.data_dir = data
    cfg.data.num_demonstrations = 4
    cfg.optim.lr = 1e10 if fault == "lr" else 1e-3
    cfg.meta.inner_lr = 1e-3
    cfg.deepspeed.zero_stage = int(stage.removeprefix("zero"))
    cfg.deepspeed.micro_batch_size = 2
    cfg.deepspeed.reduce_bucket_size = cfg.deepspeed.allgather_bucket_size = 20_000
    return cfg


def fp32_weights(engine) -> dict[str, torch.Tensor]:
    """What the optimizer trains: the fp32 master (ZeRO 1-3) or the parameters (ZeRO-0)."""
    out = {}
    for name, p in engine.module.named_parameters():
        master = deepspeed.utils.safe_get_full_fp32_param(p)  # None at ZeRO-0 (no master copy)
        out[name] = (p if master is None else master).detach().clone()
    return out


def module_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a: dict, b: dict) -> bool:
    """Two optimizer-state snapshots: the same owners in order, the same keys and values."""
    if len(a) != len(b):
        return False
    for (owner_a, sa), (owner_b, sb) in zip(a.items(), b.items(), strict=True):
        if owner_a is not owner_b or sa.keys() != sb.keys():
            return False
        for key in sa:
            x, y = sa[key], sb[key]
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
                return False
            if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
                return False
    return True


def poison_gradients(engine) -> None:
    """From now on one parameter's gradient is NaN (the losses stay finite)."""
    weight = dict(engine.module.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
    weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))


def run_case(data: str, tokenizer: str, out: Path, case: str) -> dict:
    cfg = case_config(data, tokenizer, out, case)
    stage = cfg.deepspeed.zero_stage
    ctx = setup(cfg)
    fit(ctx, stop_after=1)
    if case.endswith("grad"):
        poison_gradients(ctx.engine)
    before = fp32_weights(ctx.engine), module_weights(ctx.engine, stage)
    state_before = snapshot_optimizer_state(ctx.engine)
    epoch_before = ctx.engine.lr_scheduler.last_epoch
    fit(ctx, stop_after=1)
    result = {
        "params_equal": same_tensors(before[0], fp32_weights(ctx.engine))
        and same_tensors(before[1], module_weights(ctx.engine, stage)),
        "state_equal": same_state(state_before, snapshot_optimizer_state(ctx.engine)),
        "state_nonempty": bool(state_before),
        "weights_finite": all(bool(torch.isfinite(w).all()) for w in before[0].values()),
        "schedule_advanced": ctx.engine.lr_scheduler.last_epoch == epoch_before + 1,
        "num_skipped": ctx.state.num_skipped,
    }
    try:
        fit(ctx, max_consecutive_skips=STOP_AFTER)
    except NonFiniteStop as stop:
        ckpt_dir = Path(cfg.out_dir) / CHECKPOINTS
        saved = checkpoint_state_dict(ckpt_dir, stop.checkpoint.name)
        result.update(
            stop_exit_code=stop.exit_code,
            stop_message=str(stop),
            stop_tag=stop.checkpoint.name,
            stop_complete=C.verify(stop.checkpoint).problem is None,
            stop_latest=C.latest_tag(ckpt_dir),
            stop_weights_equal=all(torch.equal(saved[n], w) for n, w in before[0].items()),
        )
    if D.is_main():
        lines = (Path(cfg.out_dir) / HISTORY_FILE).read_text().splitlines()
        result["history"] = [json.loads(line) for line in lines]
    return result


def main() -> None:
    data, tokenizer, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    for case in sys.argv[4:]:
        result = run_case(data, tokenizer, out, case)
        (out / f"{case}.json").write_text(json.dumps(result))
    D.shutdown()


if __name__ == "__main__":
    main()
