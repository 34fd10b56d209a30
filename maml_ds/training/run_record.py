"""A run folder is a record: what `--resume` may change, and how.

`RUN/config.json` is the config the run trains with; `setup` writes it only once a checkpoint
loaded or a new run's engine is built. `--resume` starts from it; every field that then differs
from the newest checkpoint's own saved config is judged by `RESUME_RULES` (one entry per field):
a change to what the saved state means is refused, naming each field; the others are applied,
the LR schedule rebuilt (`rebuild_schedule`). docs/reliability.md, "Run records".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from maml_ds.config import ConfigError, RunConfig
from maml_ds.training import checkpoint

__all__ = [
    "RESUME_RULES",
    "WORLD_SIZE",
    "Change",
    "ResumePlan",
    "ResumeRefused",
    "ResumeRule",
    "config_changes",
    "current_world_size",
    "rebuild_schedule",
    "resume_config",
    "saved_run",
]

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
WORLD_SIZE = "world_size"
"""Not a config field: the number of ranks, compared like one (DeepSpeed saves it)."""

Kind = Literal["state", "partitioned", "applied", "schedule"]


@dataclass(frozen=True)
class ResumeRule:
    """What `--resume` does when a field differs from the checkpoint's saved config.

    state: refused (the saved weights, moments, sampler position or counters mean something
    else under the new value, or the value is restored from the checkpoint and would be
    ignored); partitioned: refused at ZeRO 1-3, applied at ZeRO-0; applied: used from the next
    update on; schedule: applied, and the LR schedule rebuilt from the new config.
    """

    kind: Kind
    reason: str


def _rules(kind: Kind, reason: str, *keys: str) -> dict[str, ResumeRule]:
    return dict.fromkeys(keys, ResumeRule(kind, reason))


RESUME_RULES: dict[str, ResumeRule] = {
    # ------------------------------------------------------------------ refused: the state
    **_rules("state", "the checkpoint's sampler, counters and optimizer use are this method's",
             "method"),
    **_rules("state", "the weights are this model's (architecture, initialisation)",
             "model.name"),
    **_rules("state", "the embeddings were trained on this tokenizer's ids", "model.tokenizer"),
    **_rules("state", "part of the objective the weights were trained on", "model.dropout"),
    **_rules("state", "the sampler's saved position indexes these tasks and examples",
             "data.data_dir", "data.setting", "data.train_fraction",
             "data.max_examples_per_task"),
    **_rules("state", "the prompts the run trains on (their format, k, truncation)",
             "data.variant", "data.num_demonstrations", "data.max_length_per_example",
             "data.max_length", "data.format", "data.score_demonstrations"),
    **_rules("state", "the sampler's saved position indexes this stream of fresh or copy "
             "prompts", "data.tasks", "data.copy_share", "copy.copy_min_length",
             "copy.copy_max_length", "copy.copy_max_prefix", "copy.copy_position_offset",
             "copy.copy_offset_from"),
    **_rules("state", "seeds the initialisation, the sampler stream and --train-fraction",
             "seed"),
    **_rules("state", "the saved AdamW moments were accumulated with these",
             "optim.betas", "optim.eps", "optim.weight_decay",
             "meta.inner_optimizer", "meta.outer_optimizer", "meta.shared_moments"),
    **_rules("state", "the meta-gradient (inner steps, second-order estimator) the run follows",
             "meta.inner_lr", "meta.second_order", "meta.fd_mode", "meta.fd_scale",
             "meta.adapted_rounding"),
    **_rules("state", "the checkpoint's partitioning and dtypes are this stage's and precision's",
             "deepspeed.zero_stage", "deepspeed.precision"),
    **_rules("state", "decides which parameters ZeRO-3 keeps whole in its saved partitions",
             "deepspeed.stage3_param_persistence_threshold"),
    **_rules("state", "restored from the checkpoint (ZeRO-1/2 save it): a new value would be "
             "recorded but not used", "optim.gradient_clipping"),
    **_rules("state", "restored with the checkpoint's loss scaler: a new value would be "
             "recorded but not used", "deepspeed.loss_scale_window",
             "deepspeed.initial_scale_power"),
    **_rules("state", "its keys can change the engine's state layout (offload, sub-groups); "
             "its content is not compared", "deepspeed.config_file"),
    WORLD_SIZE: ResumeRule(
        "partitioned",
        "ZeRO 1-3 split the optimizer state over the ranks and DeepSpeed cannot re-partition a "
        "checkpoint (at ZeRO-0 the stream is global: later updates take the new global batch)",
    ),
    # ------------------------------------------------------------------ applied
    **_rules("schedule", "the LR schedule is rebuilt: every later update uses the new "
             "lr x schedule factor at its step", "optim.lr", "optim.warmup_steps",
             "optim.schedule", "max_steps"),
    **_rules("applied", "where the run lives: a moved run folder resumes in place", "out_dir"),
    **_rules(
        "applied",
        "when to save, log and give up, not what is trained",
        "save_every",
        "log_every",
        "max_consecutive_skips",
        "validate_every",
    ),
    **_rules("applied", "how the same math runs (kernels, determinism, communication buckets)",
             "deterministic", "model.attn_implementation", "model.activation_checkpointing",
             "meta.keep_support_gradients",
             "deepspeed.reduce_bucket_size", "deepspeed.allgather_bucket_size"),
    **_rules("applied", "later updates take the new global batch; the sampler's position "
             "counts prompts (MetaICL) or tasks (MAML), not batches",
             "deepspeed.micro_batch_size", "deepspeed.gradient_accumulation_steps"),
}  # fmt: skip
"""Every RunConfig field (plus the world size) -> what `--resume` does when it changes."""

_UNCLASSIFIED = ResumeRule("state", "not classified in RESUME_RULES: kept as saved")


@dataclass(frozen=True)
class Change:
    """One field whose value differs from the checkpoint's saved config."""

    key: str
    old: Any
    new: Any
    rule: ResumeRule
    zero_stage: int
    """The checkpoint's ZeRO stage (decides a "partitioned" rule)."""

    @property
    def refused(self) -> bool:
        return self.rule.kind == "state" or (
            self.rule.kind == "partitioned" and self.zero_stage > 0
        )

    def label(self, flag_names: Mapping[str, str]) -> str:
        """``--k (data.num_demonstrations) 4 -> 8``."""
        name = flag_names.get(self.key)
        field = f"{name} ({self.key})" if name else self.key.replace(WORLD_SIZE, "world size")
        return f"{field} {self.old!r} -> {self.new!r}"

    def describe(self, flag_names: Mapping[str, str]) -> str:
        return f"{self.label(flag_names)}: {self.rule.reason}"


class ResumeRefused(ConfigError):
    """`--resume` with changes to what the checkpoint's state means; nothing was written."""

    def __init__(
        self, run_dir: Path, tag: str, refused: list[Change], flag_names: Mapping[str, str]
    ):
        super().__init__([c.describe(flag_names) for c in refused])
        self.changes = refused
        lines = "\n".join(f"  - {p}" for p in self.problems)
        self.args = (
            f"cannot resume {run_dir} from {tag} with these changes, which alter what its "
            f"saved state means (nothing was written):\n{lines}\n"
            "resume without them (`--resume` alone uses the run's own config), or train a new "
            "run with another --out",
        )


@dataclass(frozen=True)
class ResumePlan:
    """The config a resumed run trains with, and what differs from its checkpoint's."""

    config: RunConfig
    tag: str
    """The checkpoint whose saved config was the reference."""
    applied: list[Change]


def _leaves(cfg: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(section: Any, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value

    walk(cfg, "")
    return out


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    *sections, name = key.split(".")
    target: Any = cfg
    for section in sections:
        target = getattr(target, section)
    if not hasattr(target, name):
        raise ConfigError([f"unknown config key {key}"])
    setattr(target, name, value)


def config_changes(
    saved: RunConfig, cfg: RunConfig, *, saved_world: int | None = None, world: int = 1
) -> list[Change]:
    """Every field (and the world size, when the checkpoint recorded it) that differs."""
    old, new = _leaves(saved), _leaves(cfg)
    stage = saved.deepspeed.zero_stage
    changes = [
        Change(key, old[key], new[key], RESUME_RULES.get(key, _UNCLASSIFIED), stage)
        for key in new
        if old.get(key) != new[key]
    ]
    if saved_world is not None and saved_world != world:
        changes.append(Change(WORLD_SIZE, saved_world, world, RESUME_RULES[WORLD_SIZE], stage))
    return changes


def saved_run(ckpt_dir: Path) -> tuple[str, RunConfig, int | None] | None:
    """(tag, saved config, world size) from the manifest of the checkpoint a resume takes
    (`checkpoint.resume_choice`), or None when there is none (its load then says why)."""
    choice, _ = checkpoint.resume_choice(ckpt_dir)
    if choice is None or choice.manifest is None:
        return None
    raw, world = choice.manifest.get("config"), choice.manifest.get("world_size")
    if not isinstance(raw, dict):
        return None
    return choice.tag, RunConfig.from_dict(raw), world if isinstance(world, int) else None


def resume_config(
    run_dir: str | Path,
    given: Mapping[str, Any],
    *,
    base: RunConfig | None = None,
    world_size: int = 1,
    flag_names: Mapping[str, str] | None = None,
) -> ResumePlan:
    """The config to resume `run_dir` with: `base` (default RUN/config.json, else the newest
    checkpoint's saved config) with `given` ({config key: value}) set on it, compared with the
    checkpoint's saved config. Raises ResumeRefused listing every refused change."""
    run_dir = Path(run_dir)
    saved = saved_run(run_dir / CHECKPOINTS)
    if base is None and (run_dir / CONFIG_FILE).is_file():
        base = RunConfig.load(run_dir / CONFIG_FILE)
    if base is None and saved is not None:
        base = saved[1]
    if base is None:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {run_dir / CHECKPOINTS} and no {run_dir / CONFIG_FILE}; start "
            "without --resume, or point --out at the run folder that holds checkpoints/"
        )
    cfg = RunConfig.from_dict(base.to_dict())
    for key, value in given.items():
        _set(cfg, key, value)
    cfg.out_dir = str(run_dir)
    cfg.validate()
    if saved is None:  # nothing readable to compare with: the checkpoint's load reports why
        return ResumePlan(cfg, "", [])
    tag, reference, saved_world = saved
    changes = config_changes(reference, cfg, saved_world=saved_world, world=world_size)
    refused = [c for c in changes if c.refused]
    if refused:
        raise ResumeRefused(run_dir, tag, refused, flag_names or {})
    return ResumePlan(cfg, tag, changes)


def rebuild_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After a resume: the schedule of the resumed config from the restored step on.

    The checkpoint restores the scheduler's base lr and step count and the optimizer's current
    lr, all from the saved config. Here the base lr becomes `lr` and the current lr
    `lr x factor(step)` with the new config's factor (warm-up, schedule, max_steps); unchanged
    settings give the restored values bit for bit.
    """
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    step = scheduler.last_epoch
    values = [lr * factor(step) for factor in scheduler.lr_lambdas]
    for group, value in zip(scheduler.optimizer.param_groups, values, strict=True):
        group["initial_lr"] = lr
        group["lr"] = value


def current_world_size() -> int:
    """The world size this process will join (DeepSpeed's launcher sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
