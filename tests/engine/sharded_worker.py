"""The ZeRO-3 sharded path beside the gather path, per case; saves what the tests compare.

Started by tests/engine/test_sharded_path.py as one process or under `deepspeed --num_gpus 2`.
Usage: python sharded_worker.py DATA TOKENIZER OUT CASE [CASE ...], CASE a comma list of
key=value over CASE_DEFAULTS:
  kind=grad: the meta-gradient of each of the n tasks of one meta-update, computed by
      `meta_gradient` with the gather loss and with the sharded loss at the same point;
  kind=run: `steps` meta-updates through MamlStep on each path (losses, final parameters);
      ckpt=1 / attn=sdpa: the sharded run with activation checkpointing / SDPA, the gather
      run (the reference) eager without;
  kind=memory: per-rank peak (LiveTensorBytes) of one update of `method`, the sharded path
      (ckpt=1: with activation checkpointing, micro: the micro-batch size; model: a built-in
      or one of DEEP_MODELS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.memory import MemorySetup
from maml_ds.memory.measure import MeasureFixture, measure_run_config, measure_updates
from maml_ds.meta import meta_gradient
from maml_ds.training import setup
from maml_ds.training.maml import MamlStep, make_loss_fn

CASE_DEFAULTS = {
    "kind": "grad", "method": "maml-2-2", "persist": "100000", "steps": "3", "seq": "32",
    "model": "measure-4x256", "release": "0", "ckpt": "0", "attn": "eager",
    "micro": "1",
}  # fmt: skip


DEEP_MODELS = {"deep-12x256": {"n_layer": 12, "n_embd": 256, "n_head": 4, "vocab_size": 512}}
"""Random-init GPT-2 configs written to a local folder: many layers, a small vocabulary (the
largest layer 3% of the parameters, as in real LLMs; measure-4x256's embedding is 25%)."""


def model_folder(name: str, root: Path) -> str:
    """A DEEP_MODELS config as a local model folder under `root`, or `name` itself."""
    if name not in DEEP_MODELS:
        return name
    from transformers import GPT2Config

    folder = root / name
    if not (folder / "config.json").is_file():
        config = GPT2Config(n_positions=256, bos_token_id=0, eos_token_id=0, **DEEP_MODELS[name])
        config.save_pretrained(folder)
    return str(folder)


RELEASE_EACH_LAYER = {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0}
"""DeepSpeed keeps gathered parameters for a reuse within 1e9 elements by default: on a small
model the whole model stays gathered from forward to backward."""


def parse_case(case: str) -> dict[str, str]:
    out = dict(CASE_DEFAULTS)
    for item in filter(None, case.split(",")):
        key, value = item.split("=")
        assert key in out, key
        out[key] = value
    return out


def case_name(case: str) -> str:
    return case.replace(",", "_").replace("=", "-")


def case_config(data: str, tokenizer: str, out: Path, case: str) -> RunConfig:
    c = parse_case(case)
    cfg = RunConfig(method=c["method"], max_steps=int(c["steps"]) + 1, seed=11)
    cfg.out_dir = str(out)
    cfg.model.tokenizer = tokenizer
    cfg.data.data_dir = data
    cfg.data.num_demonstrations = 4
    cfg.optim.lr = 1e-3
    cfg.optim.eps = 1e-2  # as tests/engine/maml_worker.py (docs/engine.md)
    cfg.meta.inner_lr = 1e-2
    cfg.meta.second_order = "hvp-fd"
    cfg.meta.fd_scale = 1e-3
    ds = cfg.deepspeed
    ds.zero_stage, ds.micro_batch_size = 3, 1
    ds.reduce_bucket_size = ds.allgather_bucket_size = 20_000
    ds.stage3_param_persistence_threshold = int(c["persist"])
    return cfg


def full(step: MamlStep, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in step.layout.gather(local, differentiable=False).items()}


def gradient_case(cfg: RunConfig) -> dict:
    """Both paths' meta-gradient of each task at theta_0 (fresh moments), same batches."""
    ctx = setup(cfg)
    step = MamlStep(ctx, sharded=True)
    layout, spec = step.layout, cfg.method_spec
    k, n = spec.num_inner_steps, spec.num_tasks
    loss_fns = {"gather": make_loss_fn(layout), "sharded": step.sharded.loss_fn}
    out: dict[str, list] = {name: [] for name in loss_fns}
    for _ in range(n):
        batches = ctx.sampler.take(num_batches=2 * k, batch_size=D.world_size())
        local = [step.local_batch(ctx, b) for b in batches]
        for name, loss_fn in loss_fns.items():
            result = meta_gradient(
                loss_fn, layout.local_params(), local[:k], local[k:],
                inner_lr=cfg.meta.inner_lr, inner_optimizer=cfg.meta.inner_optimizer,
                second_order="first-order" if spec.first_order else "hvp-fd",
                adam_state=layout.inner_moments(), betas=cfg.optim.betas, eps=cfg.optim.eps,
                weight_decay=cfg.optim.weight_decay, fd_scale=cfg.meta.fd_scale,
                norm_fn=layout.global_norm,
            )  # fmt: skip
            step.sharded.restore()
            out[name].append(
                {
                    "grads": full(step, result.grads),
                    "query_loss": D.all_reduce_sum(result.query_loss),
                    "support_loss": D.all_reduce_sum(result.support_loss),
                }
            )
    return out


def run_case(cfg: RunConfig, out: Path, c: dict[str, str]) -> dict:
    """`steps` meta-updates on each path from the same initial model and data."""
    results, num_steps = {}, int(c["steps"])
    for name in ("gather", "sharded"):
        cfg.out_dir = str(out / name)
        if name == "sharded":
            cfg.model.activation_checkpointing = c["ckpt"] == "1"
            cfg.model.attn_implementation = c["attn"]  # type: ignore[assignment]
        ctx = setup(cfg)
        step = MamlStep(ctx, sharded=name == "sharded")
        history = [step(ctx) for _ in range(num_steps)]
        module = ctx.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            params = {n: p.detach().clone() for n, p in module.named_parameters()}
        results[name] = {
            "losses": [(s.extra["support_loss"], s.extra["query_loss"]) for s in history],
            "params": params,
        }
    return results


def memory_case(c: dict[str, str], out: Path) -> dict:
    fixture = MeasureFixture(out / "fixture", int(c["seq"]))
    if D.is_main():
        fixture.write()
        model_folder(c["model"], out)
    D.barrier()
    mem = MemorySetup(
        method=c["method"], zero_stage=3, precision="fp32", gpus_per_node=D.world_size(),
        seq_len=int(c["seq"]), reduce_bucket_size=20_000, micro_batch_size=int(c["micro"]),
        activation_checkpointing=c["ckpt"] == "1",
    )  # fmt: skip
    model = model_folder(c["model"], out)
    cfg = measure_run_config(mem, fixture, out / "run", model=model)
    if c["release"] == "1":  # ZeRO-3 releases each layer after use (no gathered-model reuse)
        json_file = out / "release.json"
        json_file.write_text(json.dumps({"zero_optimization": RELEASE_EACH_LAYER}))
        cfg.deepspeed.config_file = str(json_file)
    return {"peak": measure_updates(cfg, on_gpu=False).peak_bytes}


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    data, tokenizer, out = argv[0], argv[1], Path(argv[2])
    D.init_distributed()
    for case in argv[3:]:
        c = parse_case(case)
        where = out / case_name(case)
        cfg = case_config(data, tokenizer, where, case)
        if c["kind"] == "grad":
            result = gradient_case(cfg)
        elif c["kind"] == "run":
            result = run_case(cfg, where, c)
        else:
            result = memory_case(c, where)
        torch.save(result, out / f"{case_name(case)}-w{D.world_size()}-rank{D.rank()}.pt")
    D.shutdown()


if __name__ == "__main__":
    main()
