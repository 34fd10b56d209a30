"""Meta-training: ``setup -> fit -> export``, one optimizer update per loop iteration.

What each rank runs (``maml-ds train``), as one process or under ``deepspeed --num_gpus N``.
DeepSpeed owns ranks, ZeRO, precision, gradient reduction and clipping, the LR schedule and the
checkpoints; this module owns the data stream and the counters. The update itself comes from
`STEPS`, keyed by the method's kind (MetaICL step or MAML meta-update); docs/engine.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from rich.console import Console

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.data.prompts import PromptFormat
from maml_ds.data.reader import Example, load_meta_train_examples
from maml_ds.data.sampler import subsample_stratified
from maml_ds.data.tasks import load_setting, load_task_config
from maml_ds.deepspeed_json import build_deepspeed_config
from maml_ds.files import write_atomic
from maml_ds.meta import SharedMomentAdamW
from maml_ds.models import build_model, resolve_tokenizer
from maml_ds.training import checkpoint, run_record
from maml_ds.training.copy import build_copy_stream, copy_step
from maml_ds.training.export import export_engine
from maml_ds.training.maml import MamlStep, build_task_sampler
from maml_ds.training.metaicl import build_prompt_sampler, metaicl_step
from maml_ds.training.progress import TrainProgress
from maml_ds.training.state import StepStats, TrainContext, TrainState
from maml_ds.training.stop import NonFiniteStop, Preempted, PreemptionWatch
from maml_ds.training.validation import BEST_DIR, ValidationSet, swap_in, write_curve

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "HISTORY_FILE",
    "STEPS",
    "StepFunction",
    "StepKind",
    "build_optimizer",
    "checkpoint_path",
    "cut_history",
    "export_model",
    "fit",
    "linear_schedule",
    "load_training_tasks",
    "save_checkpoint",
    "setup",
    "step_function",
    "train",
    "write_monitor_events",
]

CONFIG_FILE, CHECKPOINTS = run_record.CONFIG_FILE, run_record.CHECKPOINTS
HISTORY_FILE = "history.jsonl"

StepFunction = Callable[[TrainContext], StepStats]
"""One optimizer update of a run: ``step(ctx) -> StepStats``."""


@dataclass(frozen=True)
class StepKind:
    """How runs of one method kind train: the sampler of their data and their update."""

    build_sampler: Callable[[RunConfig, dict[str, list[Example]], Any], Any]
    """(config, the setting's training tasks, tokenizer) -> the run's data stream."""
    make_step: Callable[[TrainContext], StepFunction]
    """Built once per context (it may own state, e.g. the MAML engine's partition layout)."""


STEPS: dict[str, StepKind] = {
    "metaicl": StepKind(build_prompt_sampler, lambda ctx: metaicl_step),
    "maml": StepKind(build_task_sampler, MamlStep),
    "copy": StepKind(build_copy_stream, lambda ctx: copy_step),
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
    if not resume and checkpoint.holds_checkpoints(ckpt_dir):
        raise checkpoint.CheckpointError(
            f"{out_dir} already holds checkpoints: pass --resume to continue that run, or "
            "choose another --out (nothing was overwritten)"
        )
    with D.main_first():
        if D.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = resolve_tokenizer(
            cfg.model.name,
            tokenizer=cfg.model.tokenizer,
            run_dir=out_dir,
            data_dir=cfg.data.data_dir,
        )
    reads_task_files = cfg.method_spec.kind != "copy" and cfg.data.tasks == "files"
    tasks = load_training_tasks(cfg) if reads_task_files else {}
    model = build_model(
        cfg.model.name,
        vocab_size=len(tokenizer),
        seed=cfg.seed,
        attn_implementation=cfg.model.attn_implementation,
        dropout=cfg.model.dropout,
        activation_checkpointing=cfg.model.activation_checkpointing,
    )
    ds_config = build_deepspeed_config(cfg, D.world_size())
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    fmt = PromptFormat(
        method=cfg.data.variant,
        newlines=cfg.data.format == "newlines",
        max_length_per_example=cfg.data.max_length_per_example,
        max_length=cfg.data.max_length,
    ).for_k(cfg.data.num_demonstrations)
    sampler = STEPS[cfg.method_spec.kind].build_sampler(cfg, tasks, tokenizer)
    ctx = TrainContext(cfg, engine, tokenizer, fmt, sampler, TrainState(), out_dir)
    if cfg.validate_every:
        ctx.validation = ValidationSet(cfg, tokenizer, fmt)
    if resume:
        client = checkpoint.load(engine, ckpt_dir, config=cfg.to_dict(), world_size=D.world_size())
        ctx.state = TrainState(**client["train_state"])
        ctx.sampler.load_state_dict(client["sampler"])
        run_record.rebuild_schedule(scheduler, cfg.optim.lr)
    if D.is_main():  # the run's record, once its checkpoint loaded or training starts
        cfg.save(out_dir / CONFIG_FILE)
    return ctx


def checkpoint_path(ctx: TrainContext) -> Path:
    """The checkpoint folder of the context's current step."""
    return ctx.out_dir / CHECKPOINTS / f"step{ctx.state.step}"


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


def fit(
    ctx: TrainContext, *, stop_after: int | None = None, max_consecutive_skips: int = 10
) -> list[dict[str, float]]:
    """Run updates until ``max_steps`` (or ``stop_after`` more updates, for tests).

    Every update's record is appended to ``history.jsonl`` as it happens (rank 0, flushed), so a
    killed job keeps it; records after the resumed step are dropped first. Stops with a
    checkpoint and a typed error (`stop.RunStopped`) after ``max_consecutive_skips`` skipped
    updates in a row (0: never) or on SIGTERM / SIGUSR1 (docs/reliability.md).
    """
    cfg, state = ctx.cfg, ctx.state
    step_fn = step_function(ctx)
    last = cfg.max_steps if stop_after is None else min(cfg.max_steps, state.step + stop_after)
    history: list[dict[str, float]] = []
    history_file = ctx.out_dir / HISTORY_FILE
    if D.is_main():
        cut_history(history_file, state.step)
    saved_step = state.step if state.step > 0 else None  # resumed: that checkpoint exists
    progress = TrainProgress(
        cfg.method,
        total=cfg.max_steps,
        start=state.step,
        last=last,
        log_every=cfg.log_every,
        enabled=D.is_main(),
    )
    with progress, PreemptionWatch() as preemption:
        if ctx.validation is not None and state.step == 0:
            score_validation(ctx)
        started = time.perf_counter()
        prompts_done = 0
        while state.step < last:
            stats = step_fn(ctx)
            state.step += 1
            state.num_prompts += stats.num_prompts
            state.num_batches += stats.num_batches
            state.num_skipped += int(stats.skipped)
            state.num_overflow += int(stats.overflow)
            applied = not (stats.skipped or stats.overflow)
            state.consecutive_skips = 0 if applied else state.consecutive_skips + 1
            prompts_done += stats.num_prompts
            rate = prompts_done / max(1e-9, time.perf_counter() - started)
            record = {
                "step": state.step,
                "loss": stats.loss,
                "prompts_per_s": rate,
                "num_batches": state.num_batches,
                "skipped": float(stats.skipped),
                "overflow": float(stats.overflow),
            }
            record.update(stats.extra)
            every = cfg.validate_every
            if every and (state.step % every == 0 or state.step == cfg.max_steps):
                record.update(score_validation(ctx))
            history.append(record)
            if D.is_main():
                with history_file.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            write_monitor_events(
                ctx.engine, state.step, {k: v for k, v in record.items() if k != "step"}
            )
            counts = {"skipped": state.num_skipped, "overflow": state.num_overflow}
            progress.update(
                state.step,
                loss=stats.loss,
                lr=float(ctx.engine.get_lr()[0]),
                prompts_per_s=rate,
                extra={
                    **{k: v for k, v in stats.extra.items() if k.endswith("loss")},
                    **{k: float(v) for k, v in counts.items() if v},
                },
            )
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < last:
                save_checkpoint(ctx)
                saved_step = state.step
            signal_name = preemption.requested()
            diverged = 0 < max_consecutive_skips <= state.consecutive_skips
            if signal_name is None and not diverged:
                continue
            tag = save_checkpoint(ctx) if saved_step != state.step else checkpoint_path(ctx)
            if diverged:
                raise NonFiniteStop(
                    f"stopped at update {state.step}: the last {state.consecutive_skips} "
                    f"updates were all skipped ({state.num_skipped} non-finite loss or gradient, "
                    f"{state.num_overflow} fp16 overflow in the whole run); checkpoint "
                    f"{tag.name} holds the weights after update "
                    f"{state.step - state.consecutive_skips}, the last one "
                    "applied. Lower --lr / --inner-lr (or set --gradient-clipping) and continue "
                    "with --resume",
                    tag,
                )
            raise Preempted(
                f"{signal_name} received: stopped after update {state.step} with checkpoint "
                f"{tag.name}; the same command with --resume continues exactly",
                tag,
            )
    if saved_step != state.step:
        save_checkpoint(ctx)
    num_not_applied = state.num_skipped + state.num_overflow
    if D.is_main() and state.step and 2 * num_not_applied > state.step:
        Console(stderr=True).print(
            f"[bold yellow]warning:[/] {num_not_applied} of {state.step} updates were skipped "
            f"({state.num_skipped} non-finite loss or gradient, {state.num_overflow} fp16 "
            "overflow): the model is mostly untrained; lower --lr / --inner-lr",
            highlight=False,
            soft_wrap=True,
        )
    return history


def write_monitor_events(engine, step: int, values: dict[str, float]) -> None:
    """`Train/<name>` events to the monitors of the DeepSpeed config (rank 0 only), through
    DeepSpeed's documented `engine.monitor.write_events`."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled or not D.is_main():
        return
    monitor.write_events([(f"Train/{k}", float(v), step) for k, v in values.items()])


def score_validation(ctx: TrainContext) -> dict[str, float]:
    """Score the validation tasks now (every rank); a new best is exported to RUN/best (update
    0 included: when no update beats the starting weights, they are the run's best);
    RUN/validation.json gets the point (what a killed run wrote later is dropped)."""
    state = ctx.state
    scores = ctx.validation.score(ctx.engine.module)
    if state.best_score is None or scores["val_score"] > state.best_score:
        state.best_step, state.best_score = state.step, scores["val_score"]
        staged = ctx.out_dir / f"{BEST_DIR}.staged"
        export_engine(ctx, staged, source=f"best validation score (update {state.step})")
        if D.is_main():
            swap_in(staged, ctx.out_dir / BEST_DIR)
        D.barrier()
    write_curve(ctx.out_dir, state.step, scores, state.best_step, state.best_score)
    return scores


def cut_history(path: Path, step: int) -> None:
    """Keep the records of ``history.jsonl`` up to ``step`` (a resumed run's checkpoint): what
    a killed run wrote after its checkpoint is run again, and a half-written line goes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    if kept != lines:
        write_atomic(path, "".join(line + "\n" for line in kept))


def export_model(ctx: TrainContext, path: str | Path) -> Path:
    """The fp32 master weights as a Hugging Face folder with the tokenizer (training/export.py)."""
    return export_engine(ctx, path)


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    export: bool = True,
) -> list[dict[str, float]]:
    """The whole run: setup, fit, export to ``out_dir/final`` when finished, clean shutdown."""
    ctx = setup(cfg, resume=resume)
    try:
        history = fit(ctx, stop_after=stop_after, max_consecutive_skips=cfg.max_consecutive_skips)
        if export and ctx.state.step >= cfg.max_steps:
            export_model(ctx, ctx.out_dir / "final")
    finally:
        D.shutdown()
    return history
