"""`maml-ds train`: what each rank runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from launcher.errors import err_console as console
from launcher.errors import fail
from maml_ds.config import ConfigError, RunConfig

# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def build_run_config(
    *,
    config: Path | None,
    method: str | None,
    data: Path | None,
    setting: str | None,
    model: str | None,
    tokenizer: str | None,
    out: Path | None,
    max_steps: int | None,
    micro_batch_size: int | None,
    gradient_accumulation_steps: int | None,
    zero: int | None,
    precision: str | None,
    variant: str | None,
    k: int | None,
    lr: float | None,
    inner_lr: float | None,
    second_order: str | None,
    fd_mode: str | None,
    fd_scale: float | None,
    inner_optimizer: str | None,
    outer_optimizer: str | None,
    shared_moments: bool | None,
    gradient_clipping: float | None,
    train_fraction: float | None,
    max_examples_per_task: int | None,
    seed: int | None,
    save_every: int | None,
    dropout: float | None,
    attn_implementation: str | None,
    max_length: int | None,
) -> RunConfig:
    """A RunConfig from a resolved config file (if given) overridden by explicit flags."""
    cfg = RunConfig.load(config) if config is not None else RunConfig()
    overrides = {
        (None, "method"): method,
        ("data", "data_dir"): str(data) if data is not None else None,
        ("data", "setting"): setting,
        ("model", "name"): model,
        ("model", "tokenizer"): tokenizer,
        (None, "out_dir"): str(out) if out is not None else None,
        (None, "max_steps"): max_steps,
        ("deepspeed", "micro_batch_size"): micro_batch_size,
        ("deepspeed", "gradient_accumulation_steps"): gradient_accumulation_steps,
        ("deepspeed", "zero_stage"): zero,
        ("deepspeed", "precision"): precision,
        ("data", "variant"): variant,
        ("data", "num_demonstrations"): k,
        ("data", "max_length"): max_length,
        ("optim", "lr"): lr,
        ("meta", "inner_lr"): inner_lr,
        ("meta", "second_order"): second_order,
        ("meta", "fd_mode"): fd_mode,
        ("meta", "fd_scale"): fd_scale,
        ("meta", "inner_optimizer"): inner_optimizer,
        ("meta", "outer_optimizer"): outer_optimizer,
        ("meta", "shared_moments"): shared_moments,
        ("optim", "gradient_clipping"): gradient_clipping,
        ("data", "train_fraction"): train_fraction,
        ("data", "max_examples_per_task"): max_examples_per_task,
        (None, "seed"): seed,
        (None, "save_every"): save_every,
        ("model", "dropout"): dropout,
        ("model", "attn_implementation"): attn_implementation,
    }
    for (section, key), value in overrides.items():
        if value is None:
            continue
        setattr(cfg if section is None else getattr(cfg, section), key, value)
    return cfg.validate()


def train_command(
    method: Annotated[str | None, typer.Option(help="metaicl | maml-2k-n | fomaml-2k-n")] = None,
    data: Annotated[Path | None, typer.Option(help="MetaICL-format data folder")] = None,
    setting: Annotated[str | None, typer.Option(help="setting name or JSON path")] = None,
    model: Annotated[
        str | None, typer.Option(help="tiny | tiny-128 | random:gpt2[-medium..] | folder | HF id")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer folder or HF id")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer updates")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="prompts per rank")] = None,
    gradient_accumulation_steps: Annotated[int | None, typer.Option()] = None,
    zero: Annotated[int | None, typer.Option(help="ZeRO stage 0-3")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | fp16 | bf16")] = None,
    variant: Annotated[str | None, typer.Option(help="direct | channel")] = None,
    k: Annotated[int | None, typer.Option(help="demonstrations per prompt")] = None,
    lr: Annotated[float | None, typer.Option(help="(outer) learning rate")] = None,
    outer_lr: Annotated[float | None, typer.Option(help="alias of --lr for MAML")] = None,
    inner_lr: Annotated[float | None, typer.Option()] = None,
    second_order: Annotated[
        str | None, typer.Option(help="hvp-fd | hvp | exact | first-order")
    ] = None,
    fd_mode: Annotated[str | None, typer.Option(help="one-sided | central")] = None,
    fd_scale: Annotated[
        float | None, typer.Option(help="FD step r = ||eps w|| / ||theta|| (default per dtype)")
    ] = None,
    inner_optimizer: Annotated[str | None, typer.Option(help="adamw | sgd")] = None,
    outer_optimizer: Annotated[str | None, typer.Option(help="adamw | sgd")] = None,
    no_shared_moments: Annotated[
        bool, typer.Option("--no-shared-moments", help="fresh inner AdamW state per update")
    ] = False,
    gradient_clipping: Annotated[float | None, typer.Option(help="0 = off")] = None,
    train_fraction: Annotated[float | None, typer.Option(help="limited data, e.g. 0.1")] = None,
    max_examples_per_task: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every N updates")] = None,
    dropout: Annotated[float | None, typer.Option()] = None,
    attn_implementation: Annotated[str | None, typer.Option(help="eager | sdpa")] = None,
    max_length: Annotated[int | None, typer.Option(help="total prompt cap (1024)")] = None,
    config: Annotated[
        Path | None, typer.Option(help="a resolved config.json to start from")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's latest checkpoint")] = False,
    stop_after: Annotated[
        int | None,
        typer.Option(
            help="stop (with a checkpoint) after N updates of this invocation; "
            "--resume continues exactly, e.g. on time-limited cluster jobs"
        ),
    ] = None,
) -> None:
    """Meta-train a causal LM (what each rank runs; `maml-ds launch` starts it on clusters)."""
    from maml_ds.data.tasks import DataError
    from maml_ds.training.checkpoint import CheckpointError
    from maml_ds.training.loop import train as run_training

    if lr is not None and outer_lr is not None and lr != outer_lr:
        raise fail("give --lr or --outer-lr, not both with different values")
    try:
        cfg = build_run_config(
            config=config,
            method=method,
            data=data,
            setting=setting,
            model=model,
            tokenizer=tokenizer,
            out=out,
            max_steps=max_steps,
            micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            zero=zero,
            precision=precision,
            variant=variant,
            k=k,
            lr=lr if lr is not None else outer_lr,
            inner_lr=inner_lr,
            second_order=second_order,
            fd_mode=fd_mode,
            fd_scale=fd_scale,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            shared_moments=False if no_shared_moments else None,
            gradient_clipping=gradient_clipping,
            train_fraction=train_fraction,
            max_examples_per_task=max_examples_per_task,
            seed=seed,
            save_every=save_every,
            dropout=dropout,
            attn_implementation=attn_implementation,
            max_length=max_length,
        )
        history = run_training(cfg, resume=resume, stop_after=stop_after)
    except (ConfigError, DataError, CheckpointError) as err:
        raise fail(str(err)) from None
    if history:
        last = history[-1]
        console.print(
            f"done: {int(last['step'])} updates, last loss {last['loss']:.4f}, "
            f"run folder {cfg.out_dir}"
        )
