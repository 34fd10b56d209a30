"""`maml-ds train`: what each rank runs. Its config flags come from RunConfig (config_flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from launcher.config_flags import apply_flags, with_config_flags
from launcher.errors import err_console as console
from launcher.errors import fail
from maml_ds.config import ConfigError, RunConfig


def build_run_config(config: Path | None, flags: dict[str, Any]) -> RunConfig:
    """A RunConfig from a resolved config file (if given) overridden by the flags given."""
    cfg = RunConfig.load(config) if config is not None else RunConfig()
    return apply_flags(cfg, flags).validate()


@with_config_flags
def train_command(
    flags: dict[str, Any],
    config: Annotated[
        Path | None, typer.Option(help="a resolved config.json to start from; flags override it")
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
    from maml_ds.training import checkpoint
    from maml_ds.training import train as run_training

    try:
        cfg = build_run_config(config, flags)
        history = run_training(cfg, resume=resume, stop_after=stop_after)
    except (ConfigError, DataError, checkpoint.CheckpointError) as err:
        raise fail(str(err)) from None
    if history:
        last = history[-1]
        console.print(
            f"done: {int(last['step'])} updates, last loss {last['loss']:.4f}, "
            f"run folder {cfg.out_dir}"
        )
