"""Broken newest checkpoints and changed configs on --resume, one rank, one process.

Started by tests/engine/test_checkpoint_fallback.py.
Usage: python checkpoint_worker.py DATA TOKENIZER OUT
A MetaICL ZeRO-2 run saves step2 and step4; each case copies it, breaks something, resumes to
step 6 and records what the resume said (stderr) and the final weights; OUT/results.pt.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.training import CHECKPOINTS, fit, setup
from maml_ds.training import checkpoint as C

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def run_config(data: str, tokenizer: str, out_dir: Path) -> RunConfig:
    cfg = RunConfig(method="metaicl", max_steps=6, seed=9, save_every=2)
    cfg.out_dir = str(out_dir)
    cfg.model.tokenizer = tokenizer
    cfg.data.data_dir = data
    cfg.data.num_demonstrations = 4
    cfg.optim.lr = 1e-3
    cfg.deepspeed.zero_stage = 2
    cfg.deepspeed.micro_batch_size = 2
    cfg.deepspeed.reduce_bucket_size = cfg.deepspeed.allgather_bucket_size = 20_000
    return cfg


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def random_bytes(path: Path) -> None:  # same size: only loading it can tell
    path.write_bytes(os.urandom(path.stat().st_size))


def empty_folder(tag_dir: Path) -> None:
    shutil.rmtree(tag_dir)
    tag_dir.mkdir()


BREAKERS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda ckpt: truncate(ckpt / "step4" / OPTIM),
    "file_deleted": lambda ckpt: (ckpt / "step4" / OPTIM).unlink(),
    "random_bytes": lambda ckpt: random_bytes(ckpt / "step4" / MODEL),
    "empty_folder": lambda ckpt: empty_folder(ckpt / "step4"),
    "latest_empty": lambda ckpt: (ckpt / C.LATEST).write_text(""),
    "latest_missing": lambda ckpt: (ckpt / C.LATEST).write_text("step9"),
    "direct_step2": lambda ckpt: (ckpt / C.LATEST).write_text("step2"),
    "direct_step4": lambda ckpt: None,
}


def resume(cfg: RunConfig) -> dict:
    """Resume `cfg`'s run to max_steps: what was said on stderr, or the error, and the weights."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            ctx = setup(cfg, resume=True)
    except C.CheckpointError as err:
        return {"error": str(err), "said": said.getvalue()}
    fit(ctx)
    weights = {n: p.detach().clone() for n, p in ctx.engine.module.named_parameters()}
    return {"said": said.getvalue(), "weights": weights, "step": ctx.state.step}


def main() -> None:
    data, tokenizer, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    base = out / "base"
    ctx = setup(run_config(data, tokenizer, base))
    fit(ctx, stop_after=4)  # saves step2 (save_every) and step4 (end of this invocation)
    results: dict[str, dict] = {}
    for name, breaker in BREAKERS.items():
        shutil.copytree(base, out / name)
        breaker(out / name / CHECKPOINTS)
        results[name] = resume(run_config(data, tokenizer, out / name))
    shutil.copytree(base, out / "all_broken")
    for tag in ("step2", "step4"):
        (out / "all_broken" / CHECKPOINTS / tag / C.MANIFEST).unlink()
    results["all_broken"] = resume(run_config(data, tokenizer, out / "all_broken"))
    changes: dict[str, Callable[[RunConfig], None]] = {
        "zero": lambda cfg: setattr(cfg.deepspeed, "zero_stage", 3),
        "zero0": lambda cfg: setattr(cfg.deepspeed, "zero_stage", 0),
        "method": lambda cfg: setattr(cfg, "method", "maml-2-2"),
        "model": lambda cfg: setattr(cfg.model, "name", "tiny-128"),
    }
    for name, change in changes.items():
        shutil.copytree(base, out / f"changed_{name}")
        cfg = run_config(data, tokenizer, out / f"changed_{name}")
        change(cfg)
        results[f"changed_{name}"] = resume(cfg)
    # Another world size: the check runs before DeepSpeed loads anything (one rank here, so the
    # engine is told it runs on two).
    ctx = setup(run_config(data, tokenizer, out / "base_world"))
    cfg_dict = run_config(data, tokenizer, base).to_dict()
    try:
        C.load(ctx.engine, base / CHECKPOINTS, config=cfg_dict, world_size=2)
        results["changed_world"] = {}
    except C.CheckpointError as err:
        results["changed_world"] = {"error": str(err)}
    torch.save(results, out / "results.pt")
    D.shutdown()


if __name__ == "__main__":
    main()
