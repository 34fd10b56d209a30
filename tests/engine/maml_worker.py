"""One MAML meta-update per case through the DeepSpeed engine; saves params, moments, peak.

Started by tests/engine/test_maml_engine.py as one process or under `deepspeed --num_gpus 2`.
Usage: python maml_worker.py DATA TOKENIZER OUT MICRO CASE [CASE ...]
with CASE a comma list of key=value over CASE_DEFAULTS, e.g. zero=2,mode=hvp-fd,method=maml-2-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.meta import LiveTensorBytes
from maml_ds.training import fit, setup, step_function
from maml_ds.training.zero_layout import PartitionLayout

CASE_DEFAULTS = {
    "zero": "0", "mode": "hvp-fd", "inner": "adamw", "outer": "adamw", "shared": "1",
    "method": "maml-2-2", "fd": "one-sided", "measure": "0", "nan": "0", "variant": "direct",
    "maxlen": "0",
}  # fmt: skip


def parse_case(case: str) -> dict[str, str]:
    out = dict(CASE_DEFAULTS)
    for item in filter(None, case.split(",")):
        key, value = item.split("=")
        assert key in out, key
        out[key] = value
    return out


def case_name(case: str, micro: int) -> str:
    return case.replace(",", "_").replace("=", "-") + f"-m{micro}"


def case_config(data: str, tokenizer: str, out: Path, micro: int, case: str) -> RunConfig:
    c = parse_case(case)
    cfg = RunConfig(method=c["method"], max_steps=3, seed=11)
    cfg.out_dir = str(out / case_name(case, micro))
    cfg.model.tokenizer = tokenizer
    cfg.data.data_dir = data
    cfg.data.num_demonstrations = 4
    cfg.optim.lr = 1e-3
    # eps 1e-2 bounds AdamW's preconditioner 1/(|g|+eps): fresh moments would otherwise turn
    # rounding-level gradients (e.g. attention key biases, exactly 0 in exact arithmetic) into
    # full-size steps, so no two summation orders could agree (docs/engine.md).
    cfg.optim.eps = 1e-2
    cfg.meta.inner_lr = 1e-2
    cfg.data.variant = c["variant"]
    if c["maxlen"] != "0":  # every prompt cut to exactly this length (left truncation)
        cfg.data.max_length = int(c["maxlen"])
        cfg.data.max_length_per_example = 32
    cfg.meta.second_order = c["mode"]
    cfg.meta.fd_mode = c["fd"]
    # A larger FD step than the accuracy-optimal default: engine and reference then differ by
    # rounding / eps ~ 1e-4 instead of ~1e-2 (the FD truncation error is the same in both).
    cfg.meta.fd_scale = 1e-3 if c["mode"] == "hvp-fd" else None
    cfg.meta.inner_optimizer = c["inner"]
    cfg.meta.outer_optimizer = c["outer"]
    cfg.meta.shared_moments = c["shared"] == "1"
    cfg.deepspeed.zero_stage = int(c["zero"])
    cfg.deepspeed.micro_batch_size = micro
    cfg.deepspeed.reduce_bucket_size = 20_000
    cfg.deepspeed.allgather_bucket_size = 20_000
    return cfg


def poison_second_task() -> None:
    """Make the second task's meta-gradient NaN on every rank (the skip path)."""
    import maml_ds.training.maml as engine_module

    original, calls = engine_module.meta_gradient, []

    def poisoned(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            for g in result.grads.values():
                g.fill_(float("nan"))
        return result

    engine_module.meta_gradient = poisoned


def full_state(layout: PartitionLayout, key: str) -> dict[str, torch.Tensor]:
    """The optimizer state ``key`` (e.g. exp_avg) of every parameter, gathered (by name)."""
    owners = layout.state_owners()
    if layout.stage == 0:
        names = layout.groups[0].names
        return {n: layout.opt.state[p][key] for n, p in zip(names, owners, strict=True)}
    local = {k: layout.opt.state[t][key] for k, t in zip(layout.keys, owners, strict=True)}
    return layout.gather(local, differentiable=False)


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    data, tokenizer, out, micro = argv[0], argv[1], Path(argv[2]), int(argv[3])
    for case in argv[4:]:
        cfg = case_config(data, tokenizer, out, micro, case)
        ctx = setup(cfg)
        if parse_case(case)["nan"] == "1":
            poison_second_task()
        if parse_case(case)["measure"] == "1":
            step = step_function(ctx)
            step(ctx)  # warm-up: optimizer state and layout exist from here on
            with LiveTensorBytes() as counter:
                step(ctx)
            history, peak = [], counter.peak_bytes
        else:
            history, peak = fit(ctx, stop_after=1), None
        layout = PartitionLayout(ctx.engine, cfg.deepspeed.zero_stage)
        module = ctx.engine.module
        with deepspeed.zero.GatheredParameters(
            list(module.parameters()), enabled=cfg.deepspeed.zero_stage == 3
        ):
            params = {n: p.detach().clone() for n, p in module.named_parameters()}
        state_keys = sorted({k for t in layout.state_owners() for k in layout.opt.state[t]})
        moments = {}
        if cfg.meta.outer_optimizer == "adamw" and "exp_avg" in state_keys:
            moments = {key: full_state(layout, key) for key in ("exp_avg", "exp_avg_sq")}
        torch.save(
            {
                "params": params,
                "moments": moments,
                "history": history,
                "peak": peak,
                "state_keys": state_keys,
            },
            out / f"{case_name(case, micro)}-rank{D.rank()}.pt",
        )
    D.shutdown()


if __name__ == "__main__":
    main()
