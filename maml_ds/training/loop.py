"""Meta-training: ``setup -> fit -> export``, one optimizer update per loop iteration.

What each rank runs (``maml-ds train``), as one process or under ``deepspeed --num_gpus N``.
DeepSpeed owns ranks, ZeRO, precision, gradient reduction and clipping, the LR schedule and the
checkpoints; this module owns the data stream and the counters. The update itself comes from
`STEPS`, keyed by the method's kind (MetaICL step or MAML meta-update); docs/engine.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from maml_ds import distributed as D
from maml_ds.config import RunConfig, build_deepspeed_config
from maml_ds.data.prompts import PromptFormat
from maml_ds.data.reader import Example, load_meta_train_examples
from maml_ds.data.sampler import subsample_stratified
from maml_ds.data.tasks import load_setting, load_task_config
from maml_ds.meta import SharedMomentAdamW
from maml_ds.models import build_model, resolve_tokenizer
from maml_ds.training import checkpoint
from maml_ds.training.maml import MamlStep, build_task_sampler
from maml_ds.training.metaicl import build_prompt_sampler, metaicl_step
from maml_ds.training.state import StepStats, TrainContext, TrainState
from maml_ds.training.zero_layout import write_monitor_events

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "STEPS",
    "StepFunction",
    "StepKind",
    "build_optimizer",
    "export_model",
    "fit",
    "linear_schedule",
    "load_training_tasks",
    "save_checkpoint",
    "setup",
    "step_function",
    "train",
]

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"

StepFunction = Callable[[TrainContext], StepStats]
"""One optimizer update of a run: ``step(ctx) -> StepStats``."""


@dataclass(frozen=True)
class StepKind:
    """How runs of one method kind train: the sampler of their data and their update."""

    build_sampler: Callable[[RunConfig, dict[str, list[Example]]], Any]
    make_step: Callable[[TrainContext], StepFunction]
    """Built once per context (it may own state, e.g. the MAML engine's partition layout)."""


STEPS: dict[str, StepKind] = {
    "metaicl": StepKind(build_prompt_sampler, lambda ctx: metaicl_step),
    "maml": StepKind(build_task_sampler, MamlStep),
}


def load_training_tasks(cfg: RunConfig) -> dict[str, list[Example]]:
    """Every training task of the setting, optionally cut to --train-fraction (stratified)."""
    data_dir = Path(cfg.data.data_dir)
    setting = load_setting(cfg.data.setting, data_dir)
    tasks: dict[str, list[Example]] = {}
    for task in setting.train:
        task_config = load_task_config(task, data_dir)
        examples = load_meta_train_examples(
            data_dir, task, min_examples=cfg.data.num_demonstrations + 1
        )
        if cfg.data.max_examples_per_task is not None:
            examples = examples[: cfg.data.max_examples_per_task]
        examples = subsample_stratified(
            examples,
            cfg.data.train_fraction,
            seed=cfg.seed,
            stratify=task_config.task_type == "classification",
        )
        tasks[task] = examples
    return tasks


def linear_schedule(cfg: RunConfig) -> Callable[[int], float]:
    warmup, total = cfg.optim.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.optim.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> SharedMomentAdamW:
    return SharedMomentAdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        inner_optimizer=cfg.meta.inner_optimizer,
        outer_optimizer=cfg.meta.outer_optimizer,
        share_moments=cfg.meta.shared_moments,
    )


def setup(cfg: RunConfig, *, resume: bool = False) -> TrainContext:
    cfg.validate()
    D.init_distributed()
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / CHECKPOINTS
    if not resume and checkpoint.latest_tag(ckpt_dir) is not None:
        raise checkpoint.CheckpointError(
            f"{out_dir} already holds checkpoints: pass --resume to continue that run, or "
            "choose another --out (nothing was overwritten)"
        )
    with D.main_first():
        if D.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(out_dir / CONFIG_FILE)
        tokenizer = resolve_tokenizer(
            cfg.model.name,
            tokenizer=cfg.model.tokenizer,
            run_dir=out_dir,
            data_dir=cfg.data.data_dir,
        )
    tasks = load_training_tasks(cfg)
    model = build_model(
        cfg.model.name,
        vocab_size=len(tokenizer),
        seed=cfg.seed,
        attn_implementation=cfg.model.attn_implementation,
        dropout=cfg.model.dropout,
    )
    ds_config = build_deepspeed_config(cfg, D.world_size())
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    fmt = PromptFormat(
        method=cfg.data.variant,
        max_length_per_example=cfg.data.max_length_per_example,
        max_length=cfg.data.max_length,
    ).for_k(cfg.data.num_demonstrations)
    sampler = STEPS[cfg.method_spec.kind].build_sampler(cfg, tasks)
    ctx = TrainContext(cfg, engine, tokenizer, fmt, sampler, TrainState(), out_dir)
    if resume:
        client = checkpoint.load(engine, ckpt_dir)
        ctx.state = TrainState(**client["train_state"])
        ctx.sampler.load_state_dict(client["sampler"])
    return ctx


def save_checkpoint(ctx: TrainContext) -> Path:
    client = {
        "train_state": asdict(ctx.state),
        "sampler": ctx.sampler.state_dict(),
        "config": ctx.cfg.to_dict(),
    }
    return checkpoint.save(ctx.engine, ctx.out_dir / CHECKPOINTS, f"step{ctx.state.step}", client)


def step_function(ctx: TrainContext) -> StepFunction:
    """The update of this run's method, built for this context (call it once per context)."""
    return STEPS[ctx.cfg.method_spec.kind].make_step(ctx)


def fit(ctx: TrainContext, *, stop_after: int | None = None) -> list[dict[str, float]]:
    """Run updates until ``max_steps`` (or ``stop_after`` more updates, for tests)."""
    cfg, state = ctx.cfg, ctx.state
    step_fn = step_function(ctx)
    last = cfg.max_steps if stop_after is None else min(cfg.max_steps, state.step + stop_after)
    history: list[dict[str, float]] = []
    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, disable=not D.is_main()) as progress:
        bar = progress.add_task(cfg.method, total=cfg.max_steps, completed=state.step, info="")
        started = time.perf_counter()
        prompts_done = 0
        while state.step < last:
            stats = step_fn(ctx)
            state.step += 1
            state.num_prompts += stats.num_prompts
            state.num_batches += stats.num_batches
            state.num_skipped += int(stats.skipped or not math.isfinite(stats.loss))
            prompts_done += stats.num_prompts
            rate = prompts_done / max(1e-9, time.perf_counter() - started)
            record = {
                "step": state.step,
                "loss": stats.loss,
                "prompts_per_s": rate,
                "num_batches": state.num_batches,
                "skipped": float(stats.skipped),
            }
            record.update(stats.extra)
            history.append(record)
            write_monitor_events(
                ctx.engine, state.step, {k: v for k, v in record.items() if k != "step"}
            )
            info = (
                f"loss {stats.loss:.4f}  batches {state.num_batches}  {rate:.1f} prompts/s"
                + "".join(f"  {k} {v:.4g}" for k, v in stats.extra.items() if k.endswith("loss"))
            )
            progress.update(bar, completed=state.step, info=info)
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < last:
                save_checkpoint(ctx)
    save_checkpoint(ctx)
    if D.is_main():
        with (ctx.out_dir / "history.jsonl").open("a") as fh:
            for record in history:
                fh.write(json.dumps(record) + "\n")
    return history


def export_model(ctx: TrainContext, path: str | Path) -> Path:
    """A Hugging Face folder (``from_pretrained`` loads it) with the tokenizer beside it."""
    path = Path(path)
    module = ctx.engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=None, enabled=ctx.cfg.deepspeed.zero_stage == 3
    ):
        if D.is_main():
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(path, state_dict=state)
            ctx.tokenizer.save_pretrained(path)
    D.barrier()
    return path


def train(
    cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, export: bool = True
) -> list[dict[str, float]]:
    """The whole run: setup, fit, export to ``out_dir/final`` when finished, clean shutdown."""
    ctx = setup(cfg, resume=resume)
    try:
        history = fit(ctx, stop_after=stop_after)
        if export and ctx.state.step >= cfg.max_steps:
            export_model(ctx, ctx.out_dir / "final")
    finally:
        D.shutdown()
    return history
