"""Pre-emption on 2 CPU ranks, the rank side: SIGTERM / SIGUSR1 on any rank makes every rank
finish the update, save, and exit with `EXIT_PREEMPTED`; SIGKILL loses at most the updates
after the last checkpoint. Either way `--resume` is bit-equal to an uninterrupted run and
history.jsonl ends complete, without duplicates. (Signals sent to `maml-ds launch` or to the
DeepSpeed runner: tests/cli/test_launch.py.) docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from maml_ds.training.loop import cut_history
from maml_ds.training.stop import EXIT_PREEMPTED
from tests.helpers import BIN, REPO, env, free_port

MAML_DS = shutil.which("maml-ds", path=str(BIN)) or "maml-ds"
DEEPSPEED = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
RUNS = {
    "metaicl-zero2": ["--method", "metaicl", "--zero", "2", "--max-steps", "16"],
    "maml-2-2-zero2": ["--method", "maml-2-2", "--zero", "2", "--max-steps", "6"],
    "maml-2-2-zero3": ["--method", "maml-2-2", "--zero", "3", "--max-steps", "6"],
}
COMMON = ["--model", "tiny", "--k", "4", "--micro-batch-size", "2", "--max-examples-per-task",
          "40", "--lr", "1e-3", "--inner-lr", "1e-3", "--save-every", "4"]  # fmt: skip


def train_args(run: str, data: Path, tokenizer: Path, out: Path) -> list[str]:
    return ["train", *RUNS[run], *COMMON, "--data", str(data), "--tokenizer", str(tokenizer),
            "--out", str(out)]  # fmt: skip


def start_with_runner(args: list[str], log: Path) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 maml-ds ...` in a process group of its own."""
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), MAML_DS, *args]
    with log.open("w") as fh:
        return subprocess.Popen(command, env=env(), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                process_group=0)  # fmt: skip


def start_ranks(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """The 2 ranks alone (no launcher), in one process group, each with its own log."""
    port, procs = free_port(), []
    for rank in range(2):
        rank_env = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        group = 0 if rank == 0 else procs[0].pid
        with (logs / f"rank{rank}.log").open("w") as fh:
            proc = subprocess.Popen([MAML_DS, *args], env=rank_env, cwd=REPO, stdout=fh,
                                    stderr=subprocess.STDOUT, process_group=group)  # fmt: skip
        procs.append(proc)
    return procs


def run_to_end(args: list[str], log: Path) -> None:
    proc = start_with_runner(args, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


def history(run: Path) -> list[dict]:
    path = run / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), "the run ended before the signal"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def rank_processes(runner: subprocess.Popen) -> list[psutil.Process]:
    """The runner's 2 rank processes (DeepSpeed starts each with --local_rank=N), by rank."""
    deadline, ranks = time.monotonic() + 120, {}
    while len(ranks) < 2:
        assert time.monotonic() < deadline and runner.poll() is None, "no ranks started"
        for proc in psutil.Process(runner.pid).children(recursive=True):
            flags = [a for a in proc.cmdline() if a.startswith("--local_rank=")]
            if flags:
                ranks[int(flags[0].split("=")[1])] = proc
        time.sleep(0.05)
    return [ranks[0], ranks[1]]


def assert_resumes_exactly(run: Path, reference: Path, args: list[str], log: Path) -> None:
    assert not (run / "final").exists()
    run_to_end([*args, "--resume"], log)
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    got, want = history(run), history(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # complete, no duplicates
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


@pytest.fixture(scope="module")
def references(synth_dir, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted 2-rank run per configuration, run when first needed."""
    out, done = tmp_path_factory.mktemp("uninterrupted"), {}

    def get(run: str) -> Path:
        if run not in done:
            run_to_end(train_args(run, synth_dir, tokenizer_dir, out / run), out / f"{run}.log")
            done[run] = out / run
        return done[run]

    return get  # type: ignore[return-value]


def saved_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().removeprefix("step")) if latest.exists() else 0


def test_sigterm_sigusr1_and_sigkill_stop_one_run_that_resumes_bit_equal(
    synth_dir, tokenizer_dir, tmp_path, references
):
    """One MetaICL run at ZeRO-2 stopped three times, each start resuming the one before:
    SIGTERM to the process group of the 2 ranks alone, SIGUSR1 to rank 0 only under the
    DeepSpeed runner (both: every rank saves and exits with `EXIT_PREEMPTED`), SIGKILL to the
    runner's group after a periodic checkpoint; the last `--resume` ends bit-equal to the
    uninterrupted run, each stop's history complete up to its checkpoint."""
    run = tmp_path / "run"
    args = train_args("metaicl-zero2", synth_dir, tokenizer_dir, run)
    ranks = start_ranks(args, tmp_path)
    wait_for(lambda: len(history(run)) >= 2, ranks)
    os.killpg(ranks[0].pid, signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in ranks]
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], log[-4000:]
    stopped = saved_step(run)
    assert f"SIGTERM received: stopped after update {stopped} with checkpoint step{stopped}" in (
        " ".join(log.split())
    )
    assert [r["step"] for r in history(run)] == list(range(1, stopped + 1))

    runner = start_with_runner([*args, "--resume"], tmp_path / "sigusr1.log")
    ranks = rank_processes(runner)
    wait_for(lambda: len(history(run)) >= stopped + 2, [runner])
    ranks[0].send_signal(signal.SIGUSR1)
    code = runner.wait(timeout=120)
    log = (tmp_path / "sigusr1.log").read_text()
    assert code == EXIT_PREEMPTED, log[-4000:]
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == []  # no rank left running
    assert "SIGUSR1 received: stopped after update" in log
    stopped = saved_step(run)
    assert [r["step"] for r in history(run)] == list(range(1, stopped + 1))

    runner = start_with_runner([*args, "--resume"], tmp_path / "sigkill.log")
    # killed after a periodic checkpoint, typically with records of later updates in
    # history.jsonl: those are dropped on resume and written again
    wait_for(lambda: saved_step(run) > stopped and len(history(run)) > saved_step(run), [runner])
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait(timeout=60)
    saved = saved_step(run)
    assert saved % 4 == 0 and len(history(run)) >= saved
    assert_resumes_exactly(run, references("metaicl-zero2"), args, tmp_path / "resume.log")


# MetaICL at ZeRO-2 is killed (and resumed) in the test above; MAML at ZeRO-2 is on demand: its
# partitioned state is covered by ZeRO-3 here and by the 1-rank resume tests (suite time)
@pytest.mark.parametrize(
    "config",
    [pytest.param("maml-2-2-zero2", marks=pytest.mark.slow), "maml-2-2-zero3"],
)
def test_sigkill_then_resume_is_bit_equal_with_a_complete_history(
    synth_dir, tokenizer_dir, tmp_path, references, config
):
    run = tmp_path / "run"
    args = train_args(config, synth_dir, tokenizer_dir, run)
    runner = start_with_runner(args, tmp_path / "run.log")
    latest = run / "checkpoints" / "latest"
    # killed after a checkpoint, typically with records of later updates in history.jsonl:
    # those are dropped on resume and written again
    wait_for(lambda: latest.exists() and len(history(run)) >= 5, [runner])
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait(timeout=60)
    saved = int(latest.read_text().removeprefix("step"))
    assert saved % 4 == 0 and len(history(run)) >= saved
    assert_resumes_exactly(run, references(config), args, tmp_path / "resume.log")


def test_resume_cuts_history_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "history.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4, 5)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-line
    cut_history(path, 4)
    assert path.read_text() == "\n".join(lines[:4]) + "\n"
    cut_history(path, 0)  # a new run in a folder where a killed one left only history
    assert path.read_text() == ""
