"""A launch plan and what `maml-ds launch` checks before any rank starts: a problem found here
is one message, not the same traceback in every rank of a cluster job (docs/launch.md)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.hostfile import HostEntry
from launcher.presets import Device, Preset, device_problems
from maml_ds.config import ConfigError, RunConfig

CONFIG_FILE = "config.json"  # the run's record (training/loop.py writes it)


@dataclass
class LaunchPlan:
    """Everything `launch` writes and runs (built without side effects by `plan_launch`)."""

    run_dir: Path
    config: RunConfig
    ds_config: dict[str, Any]
    hosts: list[HostEntry]
    preset: Preset
    num_nodes: int
    gpus_per_node: int
    argv: list[str]
    resume: bool = False
    """`-- --resume`: the ranks continue from the run's latest checkpoint."""
    preset_reason: str = "--preset"
    """Why this preset: given, or what the machine's devices chose."""
    devices: list[Device] = field(default_factory=list)
    """This machine's CUDA devices (for the real-launch checks)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables the ranks need on top of the current environment."""
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def command_line(self) -> str:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(self.env.items()))
        return prefix + shlex.join(self.argv)


def holds_run(run_dir: Path) -> bool:
    """The folder is a run's record (its config.json or checkpoints): a dry run never writes it."""
    from maml_ds.training import CHECKPOINTS, checkpoint

    return (run_dir / CONFIG_FILE).is_file() or checkpoint.holds_checkpoints(run_dir / CHECKPOINTS)


def check_before_run(plan: LaunchPlan) -> list[str]:
    """Refuse what every rank would fail on; return the data check's warnings to print."""
    from maml_ds.training import CHECKPOINTS, checkpoint

    problems = device_problems(plan.preset, plan.gpus_per_node, plan.devices)
    if checkpoint.holds_checkpoints(plan.run_dir / CHECKPOINTS) and not plan.resume:
        problems.append(
            f"{plan.run_dir} already holds checkpoints: add `-- --resume` to continue that run, "
            "or choose another --run-dir"
        )
    data_dir = Path(plan.config.data.data_dir)
    warnings: list[str] = []
    if not data_dir.is_dir():
        problems.append(
            f"data folder {data_dir} does not exist: create it with `maml-ds data synth --out "
            f"{data_dir}` (or data build / data import) or pass `-- --data DIR`"
        )
    else:
        from maml_ds.data.check import check_setting
        from maml_ds.data.tasks import DataError

        try:
            report = check_setting(
                data_dir,
                plan.config.data.setting,
                include_test=False,  # a training launch reads the meta-training files only
                num_train_demonstrations=plan.config.data.num_demonstrations,
            )
        except DataError as err:
            problems.append(str(err))
        else:
            problems += [f"data check: {p}" for p in report.problems]
            warnings = list(report.warnings)
    if problems:
        raise ConfigError(problems)
    return warnings


def memory_note(plan: LaunchPlan) -> str | None:
    """One line: the memory model's per-GPU peak for this run, and a warning if it does not fit.

    None where the memory model does not cover the run (its ConfigError says why).
    """
    from maml_ds.memory import GB, MemorySetup, memory_report

    cfg = plan.config
    try:
        report = memory_report(
            cfg.model.name,
            MemorySetup(
                method=cfg.method,
                zero_stage=cfg.deepspeed.zero_stage,
                precision=cfg.deepspeed.precision,
                num_nodes=plan.num_nodes,
                gpus_per_node=plan.gpus_per_node,
                seq_len=cfg.data.max_length,
                micro_batch_size=cfg.deepspeed.micro_batch_size,
                second_order=cfg.meta.second_order,
                attn_implementation=cfg.model.attn_implementation,
                activation_checkpointing=cfg.model.activation_checkpointing,
                reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
                keep_support_gradients=cfg.meta.keep_support_gradients,
                adapted_rounding=cfg.meta.adapted_rounding,
            ),
        )
    except (ConfigError, OSError, ValueError):
        return None  # a setup the memory model does not cover, or cannot size from a config
    peak = report.predicted_peak_bytes / GB
    line = f"memory model: {peak:.2f} GB per rank predicted peak (`maml-ds memory` for details)"
    limit = plan.preset.device_memory_gb
    if limit is not None and peak > limit:
        line += (
            f"; MORE than the {limit:g} GB of a {plan.preset.name} device: raise --zero, lower "
            "`-- --max-length` or use more GPUs"
        )
    return line
