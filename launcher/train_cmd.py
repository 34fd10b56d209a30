"""`maml-ds train`: what each rank runs. Its config flags come from RunConfig (config_flags).

`--resume` continues the run folder's own config: flags given with it are judged field by field
(maml_ds/training/run_record.py; docs/reliability.md, "Run records").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from launcher.config_flags import FLAGS, apply_flags, with_config_flags
from launcher.errors import err_console as console
from launcher.errors import fail, user_error
from maml_ds.config import ConfigError, RunConfig

FLAG_NAMES = {flag.key: flag.names[0] for flag in FLAGS}
"""Config key -> the flag that sets it, for messages naming a field."""


def build_run_config(config: Path | None, flags: dict[str, Any]) -> RunConfig:
    """A RunConfig from a resolved config file (if given) overridden by the flags given."""
    cfg = RunConfig.load(config) if config is not None else RunConfig()
    return apply_flags(cfg, flags).validate()


def resume_run_config(config: Path | None, flags: dict[str, Any]) -> RunConfig:
    """The config `--resume` continues with: the run's own (its config.json, or `config`) with
    the flags given, refused where a change alters what the checkpoint's state means."""
    from maml_ds.training.run_record import current_world_size, resume_config

    given = {flag.key: flags[flag.param_name] for flag in FLAGS}
    given = {key: value for key, value in given.items() if value is not None}
    base = RunConfig.load(config) if config is not None else None
    run_dir = given.get("out_dir") or (base or RunConfig()).out_dir
    plan = resume_config(
        run_dir, given, base=base, world_size=current_world_size(), flag_names=FLAG_NAMES
    )
    if plan.applied and os.environ.get("RANK", "0") == "0":
        changes = "; ".join(c.label(FLAG_NAMES) for c in plan.applied)
        schedule = any(c.rule.kind == "schedule" for c in plan.applied)
        console.print(
            f"resuming {run_dir} from {plan.tag} with {len(plan.applied)} change(s): {changes}"
            + (" (LR schedule rebuilt: later updates use lr x factor(step))" if schedule else ""),
            highlight=False,
            soft_wrap=True,
        )
    return plan.config


@with_config_flags
def train_command(
    flags: dict[str, Any],
    config: Annotated[
        Path | None, typer.Option(help="a resolved config.json to start from; flags override it")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue from the run's latest checkpoint with the run's own config "
            "(RUN/config.json); flags that change what its state means are refused"
        ),
    ] = False,
    stop_after: Annotated[
        int | None,
        typer.Option(
            help="stop (with a checkpoint) after N updates of this invocation; "
            "--resume continues exactly, e.g. on time-limited cluster jobs"
        ),
    ] = None,
) -> None:
    """Meta-train a causal LM (what each rank runs; `maml-ds launch` starts it on clusters)."""
    cfg, history = run_training_command(flags, config, resume=resume, stop_after=stop_after)
    if history:
        last = history[-1]
        console.print(
            f"done: {int(last['step'])} updates, last loss {last['loss']:.4f}, "
            f"run folder {cfg.out_dir}"
        )


def run_training_command(
    flags: dict[str, Any], config: Path | None, *, resume: bool, stop_after: int | None
) -> tuple[RunConfig, list[dict[str, float]]]:
    """The config of `train`'s flags, trained; user errors exit 2, stops 3 or 75."""
    from maml_ds.data.tasks import DataError
    from maml_ds.training import checkpoint
    from maml_ds.training import train as run_training
    from maml_ds.training.stop import RunStopped

    try:
        cfg = resume_run_config(config, flags) if resume else build_run_config(config, flags)
        return cfg, run_training(cfg, resume=resume, stop_after=stop_after)
    except RunStopped as err:  # diverged (exit 3) or pre-empted (exit 75): docs/reliability.md
        raise fail(str(err), err.exit_code, error=err) from None
    except (ConfigError, DataError, checkpoint.CheckpointError) as err:
        raise user_error(err) from None
