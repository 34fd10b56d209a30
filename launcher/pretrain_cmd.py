"""`maml-ds pretrain`: the starting model, made by the project (copy pre-training).

It is `maml-ds train --method copy` with pre-training defaults (`PRETRAIN_DEFAULTS`, each
overridable by its flag): the same run folder, checkpoints, --resume and export; on several
ranks `maml-ds launch --method copy -- ...` runs it. The exported RUN/final gets pretrain.json
(seed, command, time, final copy loss). docs/pretrain.md.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from launcher.config_flags import FLAGS, with_config_flags
from launcher.errors import err_console as console
from launcher.train_cmd import run_training_command
from maml_ds import distributed as D
from maml_ds.files import write_atomic

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "method": "copy",
    "out_dir": "runs/pretrain",
    "max_steps": 2800,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 100,
    "deepspeed.micro_batch_size": 32,
    "save_every": 500,
    "log_every": 100,
}
"""The measured recipe (docs/pretrain.md): 2,800 updates of 32 sequences, lr 1e-3 with 100
warm-up updates and linear decay, position offsets from update 2,000 on."""
PRETRAIN_NOTE = "pretrain.json"
COPY_LOSS_WINDOW = 50
"""The final copy loss is the mean of the last this-many updates' losses."""


def final_copy_loss(history: list[dict[str, float]]) -> float:
    losses = [r["loss"] for r in history[-COPY_LOSS_WINDOW:]]
    return sum(losses) / len(losses)


@with_config_flags
def pretrain_command(
    flags: dict[str, Any],
    config: Annotated[
        Path | None, typer.Option(help="a resolved config.json to start from; flags override it")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run folder's latest checkpoint (as `train`)")
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option(help="stop (with a checkpoint) after N updates of this call")
    ] = None,
) -> None:
    """Copy-pre-train a starting model (defaults: 2,800 updates x 32 sequences, lr 1e-3, warm-up
    100, linear decay, out runs/pretrain; any train flag overrides them)."""
    if not resume:
        by_key = {flag.key: flag.param_name for flag in FLAGS}
        for key, value in PRETRAIN_DEFAULTS.items():
            if flags[by_key[key]] is None:
                flags[by_key[key]] = value
    started = time.perf_counter()
    cfg, history = run_training_command(flags, config, resume=resume, stop_after=stop_after)
    if cfg.method != "copy":
        console.print(f"note: --method {cfg.method} given: this was not copy pre-training")
    if not history or not D.is_main():
        return
    wall = time.perf_counter() - started
    loss = final_copy_loss(history)
    final = Path(cfg.out_dir) / "final"
    if final.is_dir():
        note = {
            "command": shlex.join(["maml-ds", "pretrain", *sys.argv[2:]]),
            "seed": cfg.seed,
            "updates": int(history[-1]["step"]),
            "wall_s_this_call": round(wall, 1),
            "final_copy_loss": loss,
        }
        write_atomic(final / PRETRAIN_NOTE, json.dumps(note, indent=2) + "\n")
    console.print(
        f"pretrained: {int(history[-1]['step'])} updates in {wall:.0f} s, final copy loss "
        f"{loss:.3f} (mean of the last {min(COPY_LOSS_WINDOW, len(history))}); model "
        f"{final if final.is_dir() else cfg.out_dir}",
        highlight=False,
    )
