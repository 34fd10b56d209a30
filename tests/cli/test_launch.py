"""`maml-ds launch`: run folder, DeepSpeed command, every flag error, and real CPU launches."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from launcher.launch import plan_launch
from launcher.presets import (
    PRESETS,
    Device,
    apply_preset,
    check_preset_is_reproduced,
    load_preset_json,
    preset_dir,
)
from maml_ds.config import RunConfig
from tests.helpers import BIN, REPO, env, free_port, maml_ds

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def command_argv(stdout: str) -> tuple[dict[str, str], list[str]]:
    """The printed command (last stdout line) as (environment prefix, argv)."""
    words = shlex.split(stdout.strip().splitlines()[-1])
    prefix = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, value = words.pop(0).split("=", 1)
        prefix[key] = value
    return prefix, words


def deepspeed_args(argv: list[str]):
    from deepspeed.launcher.runner import parse_args

    assert Path(argv[0]).name == "deepspeed"
    return parse_args(argv[1:])


def dry_run(tmp_path: Path, *args: str, name: str = "run"):
    result = runner.invoke(app, ["launch", "--dry-run", "--run-dir", str(tmp_path / name), *args])
    assert result.exit_code == 0, result.output
    return result, tmp_path / name


# --------------------------------------------------------------------------------------------
# Dry runs
# --------------------------------------------------------------------------------------------


def test_dry_run_v100_maml(tmp_path):
    result, run = dry_run(
        tmp_path,
        "--nodes",
        "1",
        "--gpus",
        "8",
        "--method",
        "maml-2-4",
        "--preset",
        "v100-32gb",
        "--master-port",
        "29555",
    )
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert "bf16" not in ds
    assert (
        ds["train_batch_size"]
        == (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8)
        == 8
    )
    assert ds["gradient_clipping"] == 0.0  # MAML: off, explicitly
    assert (run / "hostfile").read_text() == "localhost slots=8\n"
    cfg = RunConfig.load(run / "config.json")
    assert cfg.method == "maml-2-4" and cfg.deepspeed.precision == "fp16"
    assert cfg.out_dir == str(run.resolve())
    from maml_ds.deepspeed_json import build_deepspeed_config

    assert build_deepspeed_config(cfg, 8) == ds  # the ranks build exactly this JSON

    prefix, argv = command_argv(result.stdout)
    assert prefix == {}  # CUDA preset: no DS_ACCELERATOR override
    args = deepspeed_args(argv)
    assert args.hostfile == str(run.resolve() / "hostfile")
    assert (args.num_nodes, args.num_gpus, args.master_port) == (1, 8, 29555)
    assert args.master_addr == "127.0.0.1" and args.no_ssh_check and not args.no_ssh
    assert not args.no_local_rank  # the root command accepts --local_rank
    assert Path(args.user_script).name == "maml-ds" and Path(args.user_script).is_file()
    assert args.user_args == ["train", "--config", str(run.resolve() / "config.json")]
    assert (run / "launch.sh").read_text().splitlines()[-1] == result.stdout.strip()


def test_train_config_reads_the_written_config(tmp_path):
    """`maml-ds train --config RUN/config.json` resolves to the same RunConfig launch wrote."""
    from launcher.train_cmd import build_run_config

    _, run = dry_run(tmp_path, "--method", "fomaml-2-1", "--gpus", "2", "--", "--max-steps", "7")
    written = RunConfig.load(run / "config.json")
    assert build_run_config(run / "config.json", {}).to_dict() == written.to_dict()
    assert written.max_steps == 7


def test_cpu_preset_and_train_options(tmp_path):
    result, run = dry_run(
        tmp_path,
        "--gpus",
        "2",
        "--method",
        "metaicl",
        "--preset",
        "cpu",
        "--",
        "--max-steps",
        "3",
        "--micro-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "4",
        "--data",
        "somewhere",
    )
    prefix, argv = command_argv(result.stdout)
    assert prefix == {"DS_ACCELERATOR": "cpu"}
    ds = json.loads((run / "ds_config.json").read_text())
    assert "fp16" not in ds and "bf16" not in ds  # fp32
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["train_batch_size"] == 2 * 4 * 2
    cfg = RunConfig.load(run / "config.json")
    assert cfg.max_steps == 3 and cfg.data.data_dir == str(Path("somewhere").resolve())
    # the options live in config.json only: the ranks get nothing else
    args = deepspeed_args(argv)
    assert args.user_args == ["train", "--config", str(run.resolve() / "config.json")]


def test_resume_and_stop_after_reach_the_ranks(tmp_path):
    """Not settings (not in config.json): what this start of the ranks does."""
    result, run = dry_run(tmp_path, "--method", "metaicl", "--", "--resume", "--stop-after", "5")
    args = deepspeed_args(command_argv(result.stdout)[1])
    # a resume reads the launch's copy: training rewrites config.json once the checkpoint loaded
    config = str(run.resolve() / "config.resume.json")
    assert args.user_args == ["train", "--config", config, "--resume", "--stop-after", "5"]
    assert (run / "config.resume.json").is_file() and not (run / "config.json").exists()


def test_a_resume_launch_leaves_the_record_alone(tmp_path):
    from launcher.launch import write_run_folder

    run = tmp_path / "run"
    run.mkdir()
    record = '{"the": "run record"}\n'
    (run / "config.json").write_text(record)
    plan = plan_launch(
        method="metaicl", nodes=1, gpus=2, preset="cpu", run_dir=run,
        train_options=["--resume", "--lr", "0.5"],
    )  # fmt: skip
    write_run_folder(plan)
    assert (run / "config.json").read_text() == record
    assert RunConfig.load(run / "config.resume.json").optim.lr == 0.5


def test_overrides_and_presets(tmp_path):
    _, run = dry_run(
        tmp_path,
        "--method",
        "metaicl",
        "--gpus",
        "4",
        "--preset",
        "a100-80gb",
        "--zero",
        "3",
        "--precision",
        "fp16",
    )
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["fp16"]["enabled"]
    _, run = dry_run(tmp_path, "--method", "metaicl", "--preset", "a100-80gb", name="run2")
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 1


def test_multi_node_hosts(tmp_path):
    result, run = dry_run(
        tmp_path,
        "--nodes",
        "2",
        "--gpus",
        "8",
        "--hosts",
        "w0,w1",
        "--method",
        "maml-2-1",
        "--preset",
        "v100-16gb",
    )
    assert (run / "hostfile").read_text() == "w0 slots=8\nw1 slots=8\n"
    args = deepspeed_args(command_argv(result.stdout)[1])
    assert (args.num_nodes, args.num_gpus) == (2, 8)
    assert not args.no_ssh and not args.no_ssh_check  # pdsh over ssh, from node 0
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 2


def test_hostfile_is_validated_and_copied(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("# two nodes\nw0 slots=8\n\nw1 slots=8 max_slots=8\nw2 slots=2\n")
    _, run = dry_run(
        tmp_path,
        "--nodes",
        "2",
        "--gpus",
        "4",
        "--hostfile",
        str(hostfile),
        "--method",
        "metaicl",
        "--preset",
        "v100-32gb",
    )
    assert (run / "hostfile").read_text() == "w0 slots=8\nw1 slots=8\nw2 slots=2\n"


def test_no_ssh_command(tmp_path):
    result, run = dry_run(
        tmp_path,
        "--nodes",
        "2",
        "--gpus",
        "1",
        "--hosts",
        "n0,n1",
        "--no-ssh",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--method",
        "metaicl",
    )
    args = deepspeed_args(command_argv(result.stdout)[1])
    assert args.no_ssh and args.node_rank == 1 and args.master_addr == "10.0.0.1"
    assert (args.num_nodes, args.num_gpus) == (2, 1)


# --------------------------------------------------------------------------------------------
# Errors (each message names the problem and its fix)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "tpu"], "unknown preset 'tpu'; --preset is one of: v100-32gb, v100-16gb"),
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--method", "maml-2"], "unknown method 'maml-2'; valid forms"),
        (["--hosts", "a", "--hostfile", "hostfiles/localhost"], "give --hostfile F or --hosts"),
        (["--nodes", "2"], "--nodes 2 needs the nodes: --hostfile F or --hosts"),
        (["--nodes", "3", "--hosts", "a,b"], "lists 2 host(s) (a, b) but --nodes is 3"),
        (["--hosts", "a,a,b", "--nodes", "2"], "host a is listed twice"),
        (["--gpus", "4", "--hostfile", "hostfiles/localhost"],
         "host localhost (line 6) has slots=2 but --gpus is 4: raise its slots or lower --gpus"),
        (["--preset", "v100-32gb", "--precision", "bf16"], "V100 has no bf16"),
        (["--precision", "fp8"], "--precision must be fp32, fp16 or bf16"),
        (["--zero", "4"], "--zero must be 0, 1, 2 or 3"),
        (["--master-port", "70000"], "--master-port must be in 1..65535"),
        (["--node-rank", "1"], "--node-rank is for --no-ssh launches"),
        (["--no-ssh"], "--no-ssh needs --node-rank R"),
        (["--no-ssh", "--node-rank", "0"], "--no-ssh needs --run-dir"),
        (["--", "--bogus"], "train options after `--`: No such option: --bogus"),
        (["--", "--zero", "2"], "`--zero` after `--` is set by launch: use --zero before `--`"),
        (["--", "--out", "x"], "`--out` after `--` is set by launch: use --run-dir"),
        (["--", "--max-steps", "0"], "--max-steps must be >= 1"),
    ],
)  # fmt: skip
def test_flag_errors(args, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    base = ["launch", "--method", "metaicl", "--dry-run"]
    if "--method" in args:
        base = ["launch", "--dry-run"]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert expected in flat(result.output)


def test_hostfile_errors_name_lines(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("w0 slots=8\nw1 slot=8\nw0 slots=8\n")
    result = runner.invoke(
        app,
        [
            "launch",
            "--method",
            "metaicl",
            "--dry-run",
            "--nodes",
            "2",
            "--gpus",
            "8",
            "--hostfile",
            str(hostfile),
        ],
    )
    assert result.exit_code == 2
    text = flat(result.output)
    assert "line 2: 'w1 slot=8' is not 'HOST slots=N'" in text
    assert "line 3: host w0 is already listed on line 1" in text


def test_every_problem_at_once():
    result = runner.invoke(
        app,
        [
            "launch",
            "--dry-run",
            "--method",
            "nope",
            "--preset",
            "tpu",
            "--nodes",
            "0",
            "--gpus",
            "0",
        ],
    )
    assert result.exit_code == 2
    text = flat(result.output)
    assert "4 problem(s)" in text
    for part in ("--nodes must be", "--gpus must be", "unknown preset", "unknown method"):
        assert part in text


def test_existing_checkpoints_need_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step3")
    (tmp_path / "data").mkdir()
    result = runner.invoke(
        app,
        [
            "launch",
            "--method",
            "metaicl",
            "--run-dir",
            str(run),
            "--",
            "--data",
            str(tmp_path / "data"),
        ],
    )
    assert result.exit_code == 2
    assert "already holds checkpoints: add `-- --resume`" in flat(result.output)


def test_missing_data_folder(tmp_path):
    result = runner.invoke(
        app,
        [
            "launch",
            "--method",
            "metaicl",
            "--run-dir",
            str(tmp_path / "r"),
            "--",
            "--data",
            str(tmp_path / "nothing"),
        ],
    )
    assert result.exit_code == 2
    assert "does not exist: create it with `maml-ds data synth" in flat(result.output)


def test_broken_data_stops_the_launch_before_any_rank(tmp_path, synth_dir):
    """The data checker runs before the ranks: a missing task file and a malformed line are
    listed (file named), nothing is started and the run folder is not written."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    train_files = sorted(data.glob("*/*_16384_100_train.jsonl"))
    train_files[0].unlink()
    with train_files[1].open("a") as fh:
        fh.write("{not json\n")
    run = tmp_path / "r"
    result = runner.invoke(
        app, ["launch", "--method", "metaicl", "--run-dir", str(run), "--", "--data", str(data)]
    )
    out = flat(result.output)
    assert result.exit_code == 2, out
    assert "data check:" in out and train_files[1].name in out
    assert train_files[0].parent.name in out
    assert not run.exists()


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_reproduced_by_the_config_builder(name):
    check_preset_is_reproduced(PRESETS[name], world_size=8)


def test_v100_presets_are_fp16_with_dynamic_loss_scaling():
    for name in ("v100-32gb", "v100-16gb"):
        data = load_preset_json(PRESETS[name])
        assert data["fp16"]["enabled"] and data["fp16"]["loss_scale"] == 0 and "bf16" not in data
    assert load_preset_json(PRESETS["a100-80gb"])["bf16"] == {"enabled": True}
    cpu = load_preset_json(PRESETS["cpu"])
    assert "fp16" not in cpu and "bf16" not in cpu
    assert PRESETS["cpu"].env(2, {"OMP_NUM_THREADS": "1"}, 8) == {"DS_ACCELERATOR": "cpu"}


def test_presets_are_kept_once():
    """launcher/ds_configs (package data) is the repository's ds_configs/, not a copy."""
    assert preset_dir().resolve() == (REPO / "ds_configs").resolve()
    assert {p.name for p in preset_dir().glob("*.json")} == {p.file for p in PRESETS.values()}


# --------------------------------------------------------------------------------------------
# The machine: preset from its devices (faked), device checks, CPU threads per rank
# --------------------------------------------------------------------------------------------

V100 = Device("Tesla V100-SXM2-32GB", 31.7)


def fake_devices(monkeypatch, devices):
    monkeypatch.setattr("launcher.launch.local_devices", lambda: list(devices))


@pytest.mark.parametrize(
    ("devices", "preset", "shown"),
    [
        ([V100] * 8, "v100-32gb", "chosen: 8 x Tesla V100-SXM2-32GB (32 GiB): v100-32gb"),
        ([Device("NVIDIA A100-SXM4-80GB", 79.2)] * 8, "a100-80gb", "a100-80gb (bf16)"),
        ([], "cpu", "cpu (accelerator cpu; chosen: no CUDA device on this machine: CPU ranks)"),
    ],
)
def test_preset_follows_the_machine(tmp_path, monkeypatch, devices, preset, shown):
    fake_devices(monkeypatch, devices)
    result, run = dry_run(tmp_path, "--nodes", "1", "--gpus", "8", "--method", "maml-2-4")
    assert shown in flat(result.output)
    cfg = RunConfig.load(run / "config.json")
    assert apply_preset(RunConfig(method="maml-2-4"), PRESETS[preset]).deepspeed.precision == (
        cfg.deepspeed.precision
    )
    prefix, _ = command_argv(result.stdout)
    assert ("DS_ACCELERATOR" in prefix) == (preset == "cpu")


def test_cuda_preset_without_cuda(tmp_path, monkeypatch):
    fake_devices(monkeypatch, [])
    (tmp_path / "data").mkdir()
    args = ["--method", "metaicl", "--preset", "v100-32gb", "--gpus", "8"]
    result, _ = dry_run(tmp_path, *args)  # planned, with a warning
    refusal = (
        "preset v100-32gb needs CUDA, but this machine has no CUDA device "
        "(torch.cuda.is_available() is False): use --preset cpu or launch on a GPU node"
    )
    assert f"a real launch would refuse this: {refusal}" in flat(result.output)
    real = ["launch", *args, "--run-dir", str(tmp_path / "r"), "--", "--data", str(tmp_path)]
    result = runner.invoke(app, real)
    assert result.exit_code == 2 and refusal in flat(result.output)
    assert not (tmp_path / "r").exists()


def test_more_gpus_than_devices(tmp_path, monkeypatch):
    fake_devices(monkeypatch, [V100] * 2)
    result = runner.invoke(
        app,
        ["launch", "--method", "metaicl", "--gpus", "8", "--run-dir", str(tmp_path / "r"),
         "--", "--data", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--gpus 8 but this machine has 2 CUDA device(s) (Tesla V100-SXM2-32GB): lower " \
        "--gpus to 2" in flat(result.output)  # fmt: skip


def test_cpu_ranks_get_a_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    result, _ = dry_run(tmp_path, "--gpus", "2", "--method", "metaicl", "--preset", "cpu")
    assert command_argv(result.stdout)[0] == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "4"}


# --------------------------------------------------------------------------------------------
# DeepSpeed launcher options, passed through (checked with DeepSpeed's own parser)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pdsh", "openmpi", "slurm", "mpich"])
def test_launcher_and_ssh_port_pass_through(tmp_path, name):
    result, _ = dry_run(
        tmp_path, "--nodes", "2", "--gpus", "8", "--hosts", "w0,w1", "--method", "metaicl",
        "--preset", "v100-32gb", "--launcher", name, "--ssh-port", "2222",
    )  # fmt: skip
    args = deepspeed_args(command_argv(result.stdout)[1])
    assert args.launcher == name and args.ssh_port == 2222
    assert (args.num_nodes, args.num_gpus) == (2, 8)


def test_include_and_exclude_choose_the_ranks(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("w0 slots=8\nw1 slots=8\n")
    common = ["--hostfile", str(hostfile), "--method", "metaicl", "--preset", "v100-32gb"]
    result, run = dry_run(tmp_path, *common, "--include", "w0:0,1@w1:2,3")
    args = deepspeed_args(command_argv(result.stdout)[1])
    assert args.include == "w0:0,1@w1:2,3" and args.exclude == ""
    assert (args.num_nodes, args.num_gpus) == (-1, -1)  # DeepSpeed refuses them beside --include
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 4
    result, run = dry_run(tmp_path, *common, "--exclude", "w1", name="run2")
    assert deepspeed_args(command_argv(result.stdout)[1]).exclude == "w1"
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 8


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--include", "w0", "--exclude", "w1", "--hostfile", "hostfiles/v100-2x8"],
         "give --include or --exclude, not both"),
        (["--include", "w0", "--gpus", "2", "--hostfile", "hostfiles/v100-2x8"],
         "--include/--exclude choose the nodes and slots: drop --nodes/--gpus"),
        (["--include", "w0"], "--include/--exclude select slots of a --hostfile: give one"),
        (["--include", "nowhere", "--hostfile", "hostfiles/v100-2x8"],
         "--include 'nowhere': Hostname 'nowhere' not found in hostfile"),
        (["--include", "worker-0:0,1@worker-1:0", "--hostfile", "hostfiles/v100-2x8"],
         "leave different slot counts per host (worker-0: 2, worker-1: 1)"),
        (["--launcher", "slurm", "--no-ssh", "--node-rank", "0", "--run-dir", "x"],
         "--launcher slurm starts every node from node 0; --no-ssh starts this node's ranks"),
        (["--ssh-port", "0"], "--ssh-port must be in 1..65535, got 0"),
        (["--launcher", "ssh"], "'ssh' is not one of 'pdsh', 'openmpi', 'slurm', 'mpich'"),
        (["--", "--deepspeed-config", "x.json"],
         "`--deepspeed-config` after `--` is set by launch: use --deepspeed-config before `--`"),
    ],
)  # fmt: skip
def test_launcher_option_errors(args, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["launch", "--method", "metaicl", "--dry-run", *args])
    assert result.exit_code == 2, result.output
    assert expected in flat(result.output.replace("│", " "))


# --------------------------------------------------------------------------------------------
# The run's DeepSpeed JSON is what the ranks use; dry runs never write into a run
# --------------------------------------------------------------------------------------------


def test_deepspeed_config_is_merged_and_the_ranks_read_the_written_file(tmp_path):
    user = tmp_path / "user.json"
    user.write_text(json.dumps({
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "mon"), "job_name": "me"},
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    }))  # fmt: skip
    _, run = dry_run(
        tmp_path, "--method", "maml-2-2", "--gpus", "2", "--zero", "2", "--deepspeed-config", user
    )
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["csv_monitor"]["output_path"] == str(tmp_path / "mon")
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 2
    cfg = RunConfig.load(run / "config.json")
    assert cfg.deepspeed.config_file == str(run.resolve() / "ds_config.json")
    from maml_ds.deepspeed_json import build_deepspeed_config

    assert build_deepspeed_config(cfg, 2) == ds  # the ranks merge the written file: the same
    # ... and an edit of that file is what they build
    ds["tensorboard"] = {"enabled": True, "output_path": "/tb"}
    (run / "ds_config.json").write_text(json.dumps(ds))
    assert build_deepspeed_config(cfg, 2)["tensorboard"] == {"enabled": True, "output_path": "/tb"}


def test_deepspeed_config_contradiction_is_one_error(tmp_path):
    user = tmp_path / "user.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    result = runner.invoke(
        app, ["launch", "--method", "metaicl", "--zero", "1", "--dry-run", "--deepspeed-config",
              str(user), "--run-dir", str(tmp_path / "r")],
    )  # fmt: skip
    assert result.exit_code == 2
    text = flat(result.output)
    assert "2 problem(s)" in text
    assert f"{user} sets zero_optimization.stage = 3 but maml-ds runs --zero 1" in text
    assert f"{user} sets `optimizer`, but maml-ds passes its own optimizer" in text
    assert not (tmp_path / "r").exists()


def test_relaunch_keeps_the_edits_and_follows_the_new_flags(tmp_path):
    _, run = dry_run(tmp_path, "--method", "metaicl", "--gpus", "2", "--zero", "1")
    ds = json.loads((run / "ds_config.json").read_text())
    ds["csv_monitor"]["job_name"] = "edited"
    (run / "ds_config.json").write_text(json.dumps(ds))
    plan = plan_launch(method="metaicl", gpus=4, zero=2, run_dir=run, devices=[])
    assert plan.ds_config["csv_monitor"]["job_name"] == "edited"  # the edit survives
    assert plan.ds_config["zero_optimization"]["stage"] == 2  # the flags decide their keys
    assert plan.ds_config["train_batch_size"] == 4
    notes = " ".join(plan.notes)
    assert "zero_optimization.stage follows this launch's flags now" in notes
    assert "train_batch_size follows this launch's flags now" in notes


OFFLOAD_CHECK = """
import json, sys
from maml_ds.config import RunConfig
from maml_ds.training import fit, setup
from maml_ds import distributed as D
runs = []
for config in sys.argv[1:]:
    ctx = setup(RunConfig.from_dict(json.loads(config)))
    runs.append({"offload": ctx.engine.zero_cpu_offload(), "losses": [r["loss"] for r in fit(ctx)]})
print(json.dumps(runs))
D.shutdown()
"""


def test_cpu_optimizer_offload_at_zero2_through_train(synth_dir, tmp_path):
    """`train --deepspeed-config` with ZeRO-Offload at ZeRO-2 on CPU: DeepSpeed accepts the
    client optimizer (with zero_force_ds_cpu_optimizer false) and MAML trains as without it
    (both runs in one process, from the configs `train`'s flags build)."""
    from launcher.config_flags import parse_options
    from launcher.train_cmd import build_run_config, train_command
    from tests.helpers import run as run_command

    user = tmp_path / "offload.json"
    user.write_text(json.dumps({
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    }))  # fmt: skip
    common = [
        "--method", "maml-2-2", "--data", str(synth_dir), "--zero", "2", "--max-steps", "2",
        "--k", "4", "--max-examples-per-task", "40", "--lr", "1e-3", "--inner-lr", "1e-3",
    ]  # fmt: skip
    configs = []
    for name, extra in (("plain", []), ("off", ["--deepspeed-config", str(user)])):
        params = parse_options(train_command, "train", [*common, "--out", str(tmp_path / name),
                                                        *extra])  # fmt: skip
        configs.append(build_run_config(None, params))
    assert configs[1].deepspeed.config_file == str(user)
    proc = run_command([sys.executable, "-c", OFFLOAD_CHECK,
                        *(json.dumps(cfg.to_dict()) for cfg in configs)])  # fmt: skip
    plain, offloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (plain["offload"], offloaded["offload"]) == (False, True)  # reached the engine
    assert offloaded["losses"] == plain["losses"] and len(plain["losses"]) == 2


@pytest.mark.parametrize("record", ["config", "dangling-latest"])
def test_dry_run_never_writes_into_a_run(tmp_path, record):
    run = tmp_path / "run"
    if record == "config":
        run.mkdir()
        (run / "config.json").write_text('{"method": "metaicl"}\n')
    else:
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text("step9")  # names no folder
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(
        app, ["launch", "--method", "metaicl", "--dry-run", "--run-dir", str(run), "--gpus", "2"]
    )
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    text = flat(result.output)
    assert (
        f"{run} holds a run: nothing written there; the files a launch would write are in" in text
    )
    copy = Path(text.split("would write are in ")[1].split()[0])
    assert RunConfig.load(copy / "config.json").out_dir == str(run)
    assert (copy / "ds_config.json").is_file() and (copy / "launch.sh").is_file()


# --------------------------------------------------------------------------------------------
# Command-line conventions
# --------------------------------------------------------------------------------------------


def test_version_and_completion():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"maml-ds {version('maml-ds')}"
    text = runner.invoke(app, ["--help"]).stdout
    assert "--install-completion" in text and "--show-completion" in text


# --------------------------------------------------------------------------------------------
# Real launches on CPU (2 ranks; the default suite's only two real runs)
# --------------------------------------------------------------------------------------------

TRAIN = ["--max-steps", "3", "--max-examples-per-task", "40", "--k", "4"]


@pytest.fixture(scope="module")
def two_rank_run(synth_dir, tmp_path_factory):
    """A 2-rank launch into RUN after a dry run there and an edit of RUN/ds_config.json (a CSV
    monitor where the user wants it): (RUN, the launch, the monitor's folder)."""
    tmp = tmp_path_factory.mktemp("launch")
    _, run = dry_run(tmp, "--gpus", "2", "--method", "metaicl", "--preset", "cpu")
    ds = json.loads((run / "ds_config.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "mine"), "job_name": "ed"}
    (run / "ds_config.json").write_text(json.dumps(ds))
    port = free_port()
    proc = maml_ds(
        "launch", "--gpus", "2", "--method", "metaicl", "--preset", "cpu", "--run-dir", run,
        "--master-port", port, "--", "--data", synth_dir, *TRAIN, timeout=300,
    )  # fmt: skip
    # the ranks removed their shared-memory all-reduce buffers (DeepSpeed leaves them behind)
    leftover = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leftover, leftover
    return run, proc, tmp / "mine"


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_real_launch_two_cpu_ranks(two_rank_run):
    run, proc, _ = two_rank_run
    assert proc.returncode == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step3"
    assert (run / "checkpoints" / "step3").is_dir()
    steps = history(run)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["num_batches"] for s in steps] == [2, 4, 6]  # 2 ranks x 1 micro-batch
    assert "DS_ACCELERATOR=cpu" in proc.stdout


def test_edited_ds_config_reaches_the_ranks(two_rank_run):
    """Edit RUN/ds_config.json (a CSV monitor where the user wants it), launch into RUN: the
    rank writes there."""
    run, _, mine = two_rank_run
    rows = (mine / "ed" / "Train_loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header + one row per update
    losses = [float(row.split(",")[1]) for row in rows[1:]]
    assert losses == [s["loss"] for s in history(run)]
    assert not (run / "monitor").exists()  # the built-in path was replaced by the user's
    assert json.loads((run / "ds_config.json").read_text())["csv_monitor"]["job_name"] == "ed"


def test_two_nodes_on_localhost_without_ssh(two_rank_run, synth_dir, tmp_path):
    """Two "nodes" (1 rank each) started by two launches in parallel, DeepSpeed's --no_ssh mode.

    Same seed and data as the 2-rank single-node run: the same losses, bit for bit.
    """
    run, port = tmp_path / "run", str(free_port())
    exe = str(BIN / "maml-ds")
    procs = [
        subprocess.Popen(
            [
                exe,
                "launch",
                "--nodes",
                "2",
                "--gpus",
                "1",
                "--hosts",
                "node0,node1",
                "--no-ssh",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "--method",
                "metaicl",
                "--preset",
                "cpu",
                "--run-dir",
                str(run),
                "--",
                "--data",
                str(synth_dir),
                *TRAIN,
            ],
            env=env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        outputs.append(out)
        assert proc.returncode == 0, out[-6000:]
    assert "node_rank=0" in outputs[0] and "node_rank=1" in outputs[1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step3"
    single = history(two_rank_run[0])
    assert [s["loss"] for s in history(run)] == [s["loss"] for s in single]
    assert [s["num_batches"] for s in history(run)] == [2, 4, 6]


def _group_members(pgid: int) -> list[str]:
    import psutil

    out = []
    for proc in psutil.process_iter(["status", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(" ".join(proc.info["cmdline"] or []))
        except (OSError, psutil.Error):
            continue
    return out


# SIGTERM to the runner alone takes the same forwarding path as to launch: on demand only
@pytest.mark.parametrize("target", ["launch", pytest.param("runner", marks=pytest.mark.slow)])
def test_sigterm_reaches_the_ranks(synth_dir, tmp_path, target):
    """SIGTERM to `maml-ds launch` or to the DeepSpeed runner alone: no rank is left running."""
    import psutil

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [str(BIN / "maml-ds"), "launch", "--gpus", "2", "--method", "metaicl", "--preset", "cpu",
         "--run-dir", str(run), "--master-port", str(free_port()), "--", "--data",
         str(synth_dir), "--max-steps", "100000", "--k", "4", "--log-every", "1"],
        env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:  # until rank 0 has finished an update
        lines.append(line)
        if "metaicl update 1/100000" in line:
            break
    else:
        raise AssertionError("".join(lines[-40:]))
    (deepspeed_runner,) = psutil.Process(proc.pid).children()
    assert len(_group_members(deepspeed_runner.pid)) >= 4  # runner, node launcher, 2 ranks
    os.kill(proc.pid if target == "launch" else deepspeed_runner.pid, signal.SIGTERM)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    assert _group_members(deepspeed_runner.pid) == [], out[-3000:]
    assert time.monotonic() - started < 60


def test_launch_eval_shares_the_pairs_and_leaves_the_run_alone(two_rank_run, tmp_path):
    """`launch --eval`: the same ranks run `maml-ds eval --model RUN ...`; the result equals a
    one-process eval, and the run's record is untouched."""
    run = two_rank_run[0]
    record = {name: (run / name).read_bytes() for name in ("config.json", "history.jsonl")}
    eval_options = ["--unseen-only", "--seeds", "100", "--k", "16", "--batch-size", "8"]
    maml_ds("eval", "--model", run, *eval_options, "--out", tmp_path / "one")
    proc = maml_ds(
        "launch", "--eval", "--gpus", "2", "--preset", "cpu", "--run-dir", run,
        "--master-port", str(free_port()), "--", *eval_options, "--out", tmp_path / "two",
    )  # fmt: skip
    assert " eval --model " in proc.stdout and "--num_gpus 2" in proc.stdout
    (one,) = sorted((tmp_path / "one").glob("eval_*.json"))
    two = json.loads((tmp_path / "two" / one.name).read_text())
    one = json.loads(one.read_text())
    for result in (one, two):
        result.pop("wall_seconds"), result["scoring"].pop("seconds")
    assert two == one
    assert {name: (run / name).read_bytes() for name in record} == record
