"""`maml-ds launch`: resolve one RunConfig, write the run folder, print and run `deepspeed`.

The run folder holds what a rank needs (config.json: every rank runs `maml-ds train --config
RUN/config.json`) and what a person reads afterwards (ds_config.json, hostfile, launch.sh). The
`maml-ds train` options after `--` are parsed with train's own flags (launcher/config_flags.py)
and written into config.json, so a typo fails once, here. One node runs locally; several nodes
run over ssh (pdsh, from node 0) or without it (`--no-ssh --node-rank R`, one launch per node,
the run folder on a shared file system). See docs/launch.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from launcher.config_flags import apply_flags, parse_options
from launcher.errors import fail
from launcher.hostfile import (
    HostEntry,
    check_resources,
    format_hostfile,
    hosts_from_list,
    read_hostfile,
)
from launcher.presets import Preset, apply_preset, check_precision, resolve_preset
from launcher.train_cmd import train_command
from maml_ds.config import ConfigError, RunConfig, build_deepspeed_config
from maml_ds.files import write_atomic

CONFIG_FILE = "config.json"
DS_CONFIG_FILE = "ds_config.json"
HOSTFILE = "hostfile"
COMMAND_FILE = "launch.sh"
DEFAULT_MASTER_PORT = 29500
OWNED_TRAIN_FLAGS = {
    "config": "launch writes RUN/config.json and passes it",
    "out": "use --run-dir (before `--`)",
    "method": "use --method before `--`",
    "zero": "use --zero before `--`",
    "precision": "use --precision before `--`",
}
"""train options that launch sets itself, so they cannot come after `--`."""


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
    env: dict[str, str] = field(default_factory=dict)
    """Variables the ranks need on top of the current environment."""
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def command_line(self) -> str:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(self.env.items()))
        return prefix + shlex.join(self.argv)


# --------------------------------------------------------------------------------------------
# Planning (pure: reads the hostfile, writes nothing)
# --------------------------------------------------------------------------------------------


def _executable(name: str) -> str:
    """A console script of this environment (the venv's own first, then PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            [
                f"the {name!r} executable is not installed in this environment "
                "(pip install -e . installs maml-ds; deepspeed comes with its package)"
            ]
        )
    return found


def apply_train_options(cfg: RunConfig, options: list[str]) -> tuple[bool, int | None]:
    """Apply the `maml-ds train` options given after `--` to cfg (in place).

    Returns the two that are not settings but say what the ranks do: (--resume, --stop-after).
    """
    try:
        params = parse_options(train_command, "train", options)
    except ConfigError as err:
        raise ConfigError([f"train options after `--`: {p}" for p in err.problems]) from None
    problems = [
        f"`--{name.replace('_', '-')}` after `--` is set by launch: {why}"
        for name, why in OWNED_TRAIN_FLAGS.items()
        if params.get(name) is not None
    ]
    if problems:
        raise ConfigError(problems)
    apply_flags(cfg, params)
    return bool(params["resume"]), params["stop_after"]


def _absolute_paths(cfg: RunConfig) -> None:
    """Paths in the config that ranks resolve must not depend on their working directory."""
    cfg.data.data_dir = str(Path(cfg.data.data_dir).expanduser().resolve())
    for section, key in (("model", "name"), ("model", "tokenizer")):
        value = getattr(getattr(cfg, section), key)
        if value and Path(value).expanduser().exists():
            setattr(getattr(cfg, section), key, str(Path(value).expanduser().resolve()))


def _resolve_hosts(
    nodes: int, gpus: int, hostfile: Path | None, hosts: str | None
) -> tuple[list[HostEntry], str]:
    if hostfile is not None:
        entries, source = read_hostfile(hostfile), f"--hostfile {hostfile}"
    elif hosts is not None:
        entries, source = hosts_from_list(hosts, gpus), "--hosts"
    else:
        entries, source = [HostEntry("localhost", gpus)], "localhost"
    check_resources(entries, nodes, gpus, source)
    return entries, source


def plan_launch(
    *,
    method: str,
    nodes: int = 1,
    gpus: int = 1,
    hostfile: Path | None = None,
    hosts: str | None = None,
    preset: str = "cpu",
    zero: int | None = None,
    precision: str | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
    master_addr: str | None = None,
    run_dir: Path | None = None,
    no_ssh: bool = False,
    node_rank: int | None = None,
    train_options: list[str] | None = None,
) -> LaunchPlan:
    """Resolve the flags into a LaunchPlan; raise one ConfigError listing every problem.

    The run's own rules are RunConfig.validate's; only what concerns starting ranks is here.
    """
    problems: list[str] = []
    if nodes < 1:
        problems.append(f"--nodes must be >= 1, got {nodes}")
    if gpus < 1:
        problems.append(f"--gpus must be >= 1 (GPUs, or CPU ranks with --preset cpu), got {gpus}")
    if not 1 <= master_port <= 65535:
        problems.append(f"--master-port must be in 1..65535, got {master_port}")
    if hostfile is not None and hosts is not None:
        problems.append("give --hostfile F or --hosts h1,h2,..., not both")
    if nodes > 1 and hostfile is None and hosts is None:
        problems.append(f"--nodes {nodes} needs the nodes: --hostfile F or --hosts h1,h2,...")
    if node_rank is not None and not no_ssh:
        problems.append("--node-rank is for --no-ssh launches (one launch per node); add --no-ssh")
    if no_ssh:
        if node_rank is None:
            problems.append("--no-ssh needs --node-rank R (this node's index, 0..nodes-1)")
        elif not 0 <= node_rank < max(nodes, 1):
            problems.append(
                f"--node-rank must be in 0..{nodes - 1} for --nodes {nodes}, got {node_rank}"
            )
        if run_dir is None:
            problems.append(
                "--no-ssh needs --run-dir (every node's launch must name the same run folder)"
            )
    cfg = RunConfig(method=method)
    preset_obj: Preset | None = None
    try:
        preset_obj = resolve_preset(preset)
        apply_preset(cfg, preset_obj)
        if precision is not None:
            check_precision(preset_obj, precision)
    except ConfigError as err:
        problems.extend(err.problems)
    if zero is not None:
        cfg.deepspeed.zero_stage = zero
    if precision is not None:
        cfg.deepspeed.precision = precision  # type: ignore[assignment]
    resume, stop_after = False, None
    try:
        resume, stop_after = apply_train_options(cfg, list(train_options or []))
    except ConfigError as err:
        problems.extend(err.problems)
    _absolute_paths(cfg)
    problems.extend(cfg.problems())
    entries: list[HostEntry] = []
    if nodes >= 1 and gpus >= 1 and not (hostfile is not None and hosts is not None):
        try:
            entries, _ = _resolve_hosts(nodes, gpus, hostfile, hosts)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    assert preset_obj is not None

    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.method_spec.name}-{stamp}"
    run_dir = run_dir.expanduser().resolve()
    cfg.out_dir = str(run_dir)
    world = nodes * gpus
    ds_config = build_deepspeed_config(cfg, world)

    argv = [_executable("deepspeed"), "--hostfile", str(run_dir / HOSTFILE)]
    if no_ssh:
        addr = master_addr or _default_master_addr(entries[0].host)
        argv += ["--no_ssh", "--node_rank", str(node_rank), "--master_addr", addr]
    elif nodes == 1:
        # One node: DeepSpeed launches locally; without these it would ssh to the host to check
        # it and to read its address.
        argv += ["--no_ssh_check", "--master_addr", master_addr or "127.0.0.1"]
    elif master_addr is not None:
        argv += ["--master_addr", master_addr]
    argv += [
        "--num_nodes", str(nodes),
        "--num_gpus", str(gpus),
        "--master_port", str(master_port),
        _executable("maml-ds"), "train", "--config", str(run_dir / CONFIG_FILE),
    ]  # fmt: skip
    # Not settings, so not in config.json: what this start of the ranks does.
    if resume:
        argv.append("--resume")
    if stop_after is not None:
        argv += ["--stop-after", str(stop_after)]
    return LaunchPlan(
        run_dir, cfg, ds_config, entries, preset_obj, nodes, gpus, argv, resume,
        dict(preset_obj.env),
    )  # fmt: skip


def _default_master_addr(first_host: str) -> str:
    return "127.0.0.1" if first_host in ("localhost", "127.0.0.1") else first_host


# --------------------------------------------------------------------------------------------
# Writing and running
# --------------------------------------------------------------------------------------------


def write_run_folder(plan: LaunchPlan) -> None:
    # Atomic writes: every node of a --no-ssh launch writes the same files into the shared folder.
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    plan.config.save(plan.run_dir / CONFIG_FILE)
    write_atomic(plan.run_dir / DS_CONFIG_FILE, json.dumps(plan.ds_config, indent=2) + "\n")
    write_atomic(plan.run_dir / HOSTFILE, format_hostfile(plan.hosts))
    script = f"#!/usr/bin/env bash\n# written by maml-ds launch\n{plan.command_line()}\n"
    write_atomic(plan.run_dir / COMMAND_FILE, script, mode=0o755)


def check_before_run(plan: LaunchPlan) -> None:
    """Problems a real launch would only meet in every rank: catch them once, here."""
    from maml_ds.training import CHECKPOINTS, checkpoint

    problems = []
    if checkpoint.latest_tag(plan.run_dir / CHECKPOINTS) is not None and not plan.resume:
        problems.append(
            f"{plan.run_dir} already holds checkpoints: add `-- --resume` to continue that run, "
            "or choose another --run-dir"
        )
    data_dir = Path(plan.config.data.data_dir)
    if not data_dir.is_dir():
        problems.append(
            f"data folder {data_dir} does not exist: create it with `maml-ds data synth --out "
            f"{data_dir}` or pass `-- --data DIR`"
        )
    if problems:
        raise ConfigError(problems)


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
                reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
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


def _summary(plan: LaunchPlan, console: Console) -> None:
    cfg, ds = plan.config, plan.config.deepspeed
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("preset", f"{plan.preset.name} (accelerator {plan.preset.accelerator})")
    table.add_row("ranks", f"{plan.num_nodes} node(s) x {plan.gpus_per_node} = {plan.world_size}")
    table.add_row("method", cfg.method)
    table.add_row("zero / precision", f"ZeRO-{ds.zero_stage} / {ds.precision}")
    table.add_row(
        "batch",
        f"train_batch_size {plan.ds_config['train_batch_size']} = micro "
        f"{plan.ds_config['train_micro_batch_size_per_gpu']} x accumulation "
        f"{plan.ds_config['gradient_accumulation_steps']} x world {plan.world_size}",
    )
    table.add_row(
        "run folder",
        f"{plan.run_dir}  ({CONFIG_FILE}, {DS_CONFIG_FILE}, {HOSTFILE}, {COMMAND_FILE})",
    )
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def launch(
    method: Annotated[str, typer.Option(help="metaicl | maml-2k-n | fomaml-2k-n")],
    nodes: Annotated[int, typer.Option(help="number of nodes")] = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per node (CPU ranks with --preset cpu)")] = 1,
    hostfile: Annotated[
        Path | None, typer.Option(help="DeepSpeed hostfile ('HOST slots=N' lines)")
    ] = None,
    hosts: Annotated[
        str | None, typer.Option(help="comma-separated node names (instead of --hostfile)")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="v100-32gb | v100-16gb | a100-80gb | cpu (ds_configs/)")
    ] = "cpu",
    zero: Annotated[int | None, typer.Option(help="ZeRO stage 0-3 (default: the preset's)")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | bf16 (default: the preset's)")
    ] = None,
    master_port: Annotated[int, typer.Option(help="rendezvous port")] = DEFAULT_MASTER_PORT,
    master_addr: Annotated[
        str | None, typer.Option(help="node 0's address (default: 127.0.0.1 on one node)")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="run folder (default runs/METHOD-TIME)")
    ] = None,
    no_ssh: Annotated[
        bool, typer.Option("--no-ssh", help="start this node's ranks only (with --node-rank)")
    ] = False,
    node_rank: Annotated[int | None, typer.Option(help="this node's index for --no-ssh")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="write the run folder and print the command only")
    ] = False,
    train_options: Annotated[
        list[str] | None, typer.Argument(help="`maml-ds train` options, after `--`")
    ] = None,
) -> None:
    """Write a run folder (config, DeepSpeed JSON, hostfile) and start `deepspeed` on it.

    Example: maml-ds launch --nodes 2 --gpus 8 --hostfile hostfiles/v100-2x8 --method maml-2-4
    --preset v100-32gb -- --data data/metaicl --setting hr_to_lr --max-steps 30000
    """
    console = Console(stderr=True)
    try:
        plan = plan_launch(
            method=method,
            nodes=nodes,
            gpus=gpus,
            hostfile=hostfile,
            hosts=hosts,
            preset=preset,
            zero=zero,
            precision=precision,
            master_port=master_port,
            master_addr=master_addr,
            run_dir=run_dir,
            no_ssh=no_ssh,
            node_rank=node_rank,
            train_options=list(train_options or []),
        )
        if not dry_run:
            check_before_run(plan)
    except ConfigError as err:
        raise fail(str(err)) from None
    if plan.preset.accelerator == "cpu" and _cuda_visible():
        plan.notes.append("CUDA devices are visible but --preset cpu starts CPU ranks")
    note = memory_note(plan)
    if note:
        plan.notes.append(note)
    write_run_folder(plan)
    _summary(plan, console)
    typer.echo(plan.command_line())
    if dry_run:
        return
    completed = subprocess.run(plan.argv, env={**os.environ, **plan.env}, check=False)
    if completed.returncode != 0:
        console.print(f"[bold red]deepspeed exited with code {completed.returncode}[/]")
    raise typer.Exit(completed.returncode)


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always imports in this environment
        return False
