"""`maml-ds launch`: resolve one RunConfig, write the run folder, print and run `deepspeed`.

The run folder holds what a rank reads (config.json: every rank runs `maml-ds train --config
RUN/config.json`; ds_config.json, merged over the DeepSpeed JSON the rank builds) and what a
person reads afterwards (hostfile, launch.sh). The `maml-ds train` options after `--` are parsed
with train's own flags (launcher/config_flags.py), so a typo fails once, here. The preset follows
the machine's CUDA devices unless given. SIGINT/SIGTERM/SIGUSR1 are forwarded to the DeepSpeed
runner's process group. See docs/launch.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

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
    select_slots,
)
from launcher.launch_checks import LaunchPlan, check_before_run, holds_run, memory_note
from launcher.presets import (
    Device,
    Preset,
    apply_preset,
    check_precision,
    device_problems,
    local_devices,
    preset_for_devices,
    resolve_preset,
)
from launcher.process_group import run_forwarding_signals
from launcher.train_cmd import train_command
from maml_ds.config import ConfigError, RunConfig
from maml_ds.deepspeed_json import (
    build_deepspeed_config,
    deepspeed_contradictions,
    merge_deepspeed_config,
    read_deepspeed_json,
    without_keys,
)
from maml_ds.files import write_atomic

CONFIG_FILE = "config.json"
RESUME_CONFIG_FILE = "config.resume.json"
"""With `-- --resume` the ranks read this copy: config.json, the run's record, is rewritten by
training only once the checkpoint has loaded and the changes were judged (docs/launch.md)."""
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
    "deepspeed_config": "use --deepspeed-config before `--`",
}
"""train options that launch sets itself, so they cannot come after `--`."""
Launcher = Literal["pdsh", "openmpi", "slurm", "mpich"]


# --------------------------------------------------------------------------------------------
# Planning (pure: reads the hostfile, writes nothing)
# --------------------------------------------------------------------------------------------


def config_file_for(resume: bool) -> str:
    """The config file the ranks read: config.json, or its launch copy for a resume."""
    return RESUME_CONFIG_FILE if resume else CONFIG_FILE


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
    nodes: int | None = None,
    gpus: int | None = None,
    hostfile: Path | None = None,
    hosts: str | None = None,
    preset: str | None = None,
    zero: int | None = None,
    precision: str | None = None,
    deepspeed_config: Path | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
    master_addr: str | None = None,
    run_dir: Path | None = None,
    no_ssh: bool = False,
    node_rank: int | None = None,
    launcher: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    ssh_port: int | None = None,
    devices: Sequence[Device] | None = None,
    train_options: list[str] | None = None,
) -> LaunchPlan:
    """Resolve the flags into a LaunchPlan; raise one ConfigError listing every problem.

    The run's own rules are RunConfig.validate's; only what concerns starting ranks is here.
    `devices` (default: this machine's) choose the preset when `preset` is None.
    """
    problems: list[str] = []
    selecting = include is not None or exclude is not None
    if selecting:
        if include is not None and exclude is not None:
            problems.append("give --include or --exclude, not both (DeepSpeed's rule)")
        if nodes is not None or gpus is not None:
            problems.append(
                "--include/--exclude choose the nodes and slots: drop --nodes/--gpus "
                "(DeepSpeed refuses both)"
            )
        if hostfile is None:
            problems.append("--include/--exclude select slots of a --hostfile: give one")
    nodes = 1 if nodes is None else nodes
    gpus = 1 if gpus is None else gpus
    for flag, port in (("--master-port", master_port), ("--ssh-port", ssh_port)):
        if port is not None and not 1 <= port <= 65535:
            problems.append(f"{flag} must be in 1..65535, got {port}")
    if launcher is not None and no_ssh:
        problems.append(
            f"--launcher {launcher} starts every node from node 0; --no-ssh starts this "
            "node's ranks only: drop one"
        )
    if nodes < 1:
        problems.append(f"--nodes must be >= 1, got {nodes}")
    if gpus < 1:
        problems.append(f"--gpus must be >= 1 (GPUs, or CPU ranks with --preset cpu), got {gpus}")
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
    devices = local_devices() if devices is None else list(devices)
    preset_obj: Preset | None = None
    reason = "--preset"
    try:
        if preset is None:
            preset_obj, reason = preset_for_devices(devices)
        else:
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
    if deepspeed_config is not None:
        cfg.deepspeed.config_file = str(deepspeed_config.expanduser().resolve())
    resume, stop_after = False, None
    try:
        resume, stop_after = apply_train_options(cfg, list(train_options or []))
    except ConfigError as err:
        problems.extend(err.problems)
    _absolute_paths(cfg)
    problems.extend(cfg.problems())
    entries: list[HostEntry] = []
    if selecting and hostfile is not None:
        try:
            entries = read_hostfile(hostfile)
            nodes, gpus = _selected_shape(select_slots(entries, include, exclude))
        except ConfigError as err:
            problems.extend(err.problems)
    elif nodes >= 1 and gpus >= 1 and not (hostfile is not None and hosts is not None):
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
    notes: list[str] = []
    run_ds_config = run_dir / DS_CONFIG_FILE
    if cfg.deepspeed.config_file is None and run_ds_config.is_file():
        ds_config = _relaunch_ds_config(cfg, nodes * gpus, run_ds_config, notes)
    else:
        ds_config = build_deepspeed_config(cfg, nodes * gpus)
    cfg.deepspeed.config_file = str(run_ds_config)  # what the ranks merge: the written JSON

    argv = [_executable("deepspeed"), "--hostfile", str(run_dir / HOSTFILE)]
    if launcher is not None:
        argv += ["--launcher", launcher]
    if include is not None:
        argv += ["--include", include]
    if exclude is not None:
        argv += ["--exclude", exclude]
    if ssh_port is not None:
        argv += ["--ssh_port", str(ssh_port)]
    if no_ssh:
        first = entries[0].host
        addr = master_addr or ("127.0.0.1" if first in ("localhost", "127.0.0.1") else first)
        argv += ["--no_ssh", "--node_rank", str(node_rank), "--master_addr", addr]
    elif nodes == 1:
        # One node: DeepSpeed launches locally; without these it would ssh to the host to check
        # it and to read its address.
        argv += ["--no_ssh_check", "--master_addr", master_addr or "127.0.0.1"]
    elif master_addr is not None:
        argv += ["--master_addr", master_addr]
    if not selecting:  # DeepSpeed refuses --num_nodes/--num_gpus beside --include/--exclude
        argv += ["--num_nodes", str(nodes), "--num_gpus", str(gpus)]
    argv += [
        "--master_port", str(master_port),
        _executable("maml-ds"), "train", "--config", str(run_dir / config_file_for(resume)),
    ]  # fmt: skip
    # Not settings, so not in config.json: what this start of the ranks does.
    if resume:
        argv.append("--resume")
    if stop_after is not None:
        argv += ["--stop-after", str(stop_after)]
    env = preset_obj.env(gpus, os.environ, len(os.sched_getaffinity(0)))
    return LaunchPlan(
        run_dir, cfg, ds_config, entries, preset_obj, nodes, gpus, argv, resume,
        preset_reason=reason, devices=devices, env=env, notes=notes,
    )  # fmt: skip


def _relaunch_ds_config(
    cfg: RunConfig, world_size: int, existing: Path, notes: list[str]
) -> dict[str, Any]:
    """The run folder's DeepSpeed JSON (edits included) merged over the built one, for a launch
    into a folder an earlier launch wrote: keys a maml-ds setting decides follow this launch's
    flags (a note names each change); the other keys are the user's control surface."""
    built = build_deepspeed_config(cfg, world_size)
    user = read_deepspeed_json(existing)
    changed = deepspeed_contradictions(built, user, existing)
    for key in changed:
        notes.append(f"{existing}: {key} follows this launch's flags now")
    notes.append(f"{existing} (edits included) merged over the built DeepSpeed config")
    return merge_deepspeed_config(built, without_keys(user, list(changed)), existing)


def _selected_shape(selected: list[HostEntry]) -> tuple[int, int]:
    """(nodes, ranks per node) of an --include/--exclude selection (the same on every node)."""
    counts = {e.slots for e in selected}
    if len(counts) != 1:
        per_host = ", ".join(f"{e.host}: {e.slots}" for e in selected)
        raise ConfigError(
            [f"--include/--exclude leave different slot counts per host ({per_host}); "
             "maml-ds runs the same number of ranks on every node"]
        )  # fmt: skip
    return len(selected), counts.pop()


# --------------------------------------------------------------------------------------------
# Writing and running
# --------------------------------------------------------------------------------------------


def write_run_folder(plan: LaunchPlan, folder: Path | None = None) -> None:
    """The run folder's files, into `folder` (default: the run folder itself)."""
    # Atomic writes: every node of a --no-ssh launch writes the same files into the shared folder.
    folder = plan.run_dir if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    plan.config.save(folder / config_file_for(plan.resume))
    write_atomic(folder / DS_CONFIG_FILE, json.dumps(plan.ds_config, indent=2) + "\n")
    write_atomic(folder / HOSTFILE, format_hostfile(plan.hosts))
    script = f"#!/usr/bin/env bash\n# written by maml-ds launch\n{plan.command_line()}\n"
    write_atomic(folder / COMMAND_FILE, script, mode=0o755)


def _summary(plan: LaunchPlan, console: Console) -> None:
    cfg, ds = plan.config, plan.config.deepspeed
    table = Table(show_header=False, box=None, pad_edge=False)
    chosen = "" if plan.preset_reason == "--preset" else f"; chosen: {plan.preset_reason}"
    table.add_row("preset", f"{plan.preset.name} (accelerator {plan.preset.accelerator}{chosen})")
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
    method: Annotated[
        str | None,
        typer.Option(help="metaicl | maml-2k-n | fomaml-2k-n (with --eval: the run's own)"),
    ] = None,
    nodes: Annotated[int | None, typer.Option(help="number of nodes  [default: 1]")] = None,
    gpus: Annotated[
        int | None, typer.Option(help="GPUs per node (CPU ranks with --preset cpu)  [default: 1]")
    ] = None,
    hostfile: Annotated[
        Path | None, typer.Option(help="DeepSpeed hostfile ('HOST slots=N' lines)")
    ] = None,
    hosts: Annotated[
        str | None, typer.Option(help="comma-separated node names (instead of --hostfile)")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="v100-32gb | v100-16gb | a100-80gb | cpu (ds_configs/); default: the one "
            "this machine's CUDA devices match, cpu without CUDA"
        ),
    ] = None,
    zero: Annotated[int | None, typer.Option(help="ZeRO stage 0-3 (default: the preset's)")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | bf16 (default: the preset's)")
    ] = None,
    deepspeed_config: Annotated[
        Path | None,
        typer.Option(help="a DeepSpeed JSON merged over the built one (docs/launch.md)"),
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
    launcher: Annotated[
        Launcher | None,
        typer.Option(help="DeepSpeed's multi-node launcher (default: DeepSpeed's, pdsh)"),
    ] = None,
    include: Annotated[
        str | None, typer.Option(help="DeepSpeed's --include, e.g. 'w0:0,1@w1' (with --hostfile)")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option(help="DeepSpeed's --exclude, e.g. 'w1:7' (with --hostfile)")
    ] = None,
    ssh_port: Annotated[int | None, typer.Option(help="ssh port of the nodes")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="print the command and write the run folder only (a temporary copy if the "
            "folder already holds a run)",
        ),
    ] = False,
    eval_run: Annotated[
        bool,
        typer.Option(
            "--eval",
            help="evaluate the run in --run-dir on these ranks instead of training: the "
            "options after `--` are `maml-ds eval` options (its (task, seed) pairs are shared)",
        ),
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
    options = list(train_options or [])
    try:
        if eval_run:
            method, options = _eval_launch_method(run_dir), []
        elif method is None:
            raise ConfigError(["--method is required (metaicl | maml-2k-n | fomaml-2k-n)"])
        plan = plan_launch(
            method=method,
            nodes=nodes,
            gpus=gpus,
            hostfile=hostfile,
            hosts=hosts,
            preset=preset,
            zero=zero,
            precision=precision,
            deepspeed_config=deepspeed_config,
            master_port=master_port,
            master_addr=master_addr,
            run_dir=run_dir,
            no_ssh=no_ssh,
            node_rank=node_rank,
            launcher=launcher,
            include=include,
            exclude=exclude,
            ssh_port=ssh_port,
            train_options=options,
        )
        if eval_run:
            _as_eval_launch(plan, list(train_options or []))
        elif not dry_run:
            plan.notes += check_before_run(plan)
    except ConfigError as err:
        raise fail(str(err)) from None
    if dry_run:
        plan.notes += [
            f"a real launch would refuse this: {p}"
            for p in device_problems(plan.preset, plan.gpus_per_node, plan.devices)
        ]
    if plan.preset.accelerator == "cpu" and plan.devices:
        plan.notes.append("CUDA devices are visible but --preset cpu starts CPU ranks")
    if launcher is not None and plan.num_nodes == 1:
        plan.notes.append(f"--launcher {launcher} has no effect on one node (started locally)")
    note = memory_note(plan)
    if note:
        plan.notes.append(note)
    folder = plan.run_dir
    if eval_run and not dry_run:  # the run's record stays as it is: a hostfile beside eval/
        folder = plan.run_dir / "eval" / "launch"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / HOSTFILE, format_hostfile(plan.hosts))
    elif dry_run and holds_run(plan.run_dir):
        folder = Path(tempfile.mkdtemp(prefix="maml-ds-dry-run-"))
        plan.notes.append(
            f"{plan.run_dir} holds a run: nothing written there; the files a launch would "
            f"write are in {folder}"
        )
    if not eval_run:
        write_run_folder(plan, folder)
    _summary(plan, console)
    typer.echo(plan.command_line())
    if dry_run:
        return
    code = run_forwarding_signals(plan.argv, {**os.environ, **plan.env}, console)
    if code != 0:
        console.print(f"[bold red]deepspeed exited with code {code}[/]")
    raise typer.Exit(code)


def _eval_launch_method(run_dir: Path | None) -> str:
    """`launch --eval`: the run folder's method (its config.json), for the plan's batch sizes."""
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            [f"--eval needs --run-dir of a trained run (with {CONFIG_FILE}), got {run_dir}"]
        )
    return RunConfig.load(run_dir / CONFIG_FILE).method


def _as_eval_launch(plan: LaunchPlan, eval_options: list[str]) -> None:
    """Turn a training plan into `maml-ds eval --model RUN ...` on the same ranks."""
    at = plan.argv.index(_executable("maml-ds"))
    hostfile = plan.argv.index("--hostfile") + 1
    plan.argv[hostfile] = str(plan.run_dir / "eval" / "launch" / HOSTFILE)
    plan.argv[at:] = [_executable("maml-ds"), "eval", "--model", str(plan.run_dir), *eval_options]
