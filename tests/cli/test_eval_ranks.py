"""`maml-ds eval` on 2 DeepSpeed CPU ranks equals one process; progress lines in a log file;
every figure of the result in the 80-column tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest

from tests.helpers import BIN, REPO, deepspeed_run, env

RESULT = "eval_synthetic_unseen_direct_none_k16.json"


def _args(synth_dir, tokenizer_dir, out) -> list[str]:
    # 6 unseen-domain tasks x 2 seeds = 12 (task, seed) pairs on a random-init tiny GPT-2
    return [
        "eval",
        "--model",
        "tiny",
        "--tokenizer",
        str(tokenizer_dir),
        "--data",
        str(synth_dir),
        "--setting",
        "synthetic",
        "--unseen-only",
        "--seeds",
        "100,13",
        "--batch-size",
        "8",
        "--log-every",
        "4",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def one_process(synth_dir, tokenizer_dir, tmp_path_factory):
    """One plain process, COLUMNS=80, stdout and stderr written to files (as in a SLURM job):
    (output folder, stdout text, stderr text, wall seconds)."""
    out = tmp_path_factory.mktemp("eval-one")
    exe = shutil.which("maml-ds", path=str(BIN))
    with (out / "stdout.log").open("w") as stdout, (out / "stderr.log").open("w") as stderr:
        started = time.perf_counter()
        code = subprocess.run(
            [exe, *_args(synth_dir, tokenizer_dir, out)],
            env=env() | {"COLUMNS": "80"},
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
            timeout=600,
        ).returncode
        seconds = time.perf_counter() - started
    logs = (out / "stdout.log").read_text(), (out / "stderr.log").read_text()
    assert code == 0, f"maml-ds eval failed ({code}):\n{logs[1][-8000:]}"
    return out, *logs, seconds


def _numbers(result: dict) -> dict:
    """The result file without its wall-time fields."""
    out = json.loads(json.dumps(result))
    out.pop("wall_seconds")
    out["scoring"].pop("seconds")
    return out


def test_two_ranks_give_the_one_process_result(synth_dir, tokenizer_dir, one_process, tmp_path):
    one_dir, _, _, one_seconds = one_process
    exe = shutil.which("maml-ds", path=str(BIN))
    started = time.perf_counter()
    proc = deepspeed_run(exe, *_args(synth_dir, tokenizer_dir, tmp_path))
    two_seconds = time.perf_counter() - started
    one = json.loads((one_dir / RESULT).read_text())
    two = json.loads((tmp_path / RESULT).read_text())
    assert _numbers(two) == _numbers(one)  # every score, prediction, token count
    assert sum(len(t["seeds"]) for t in two["per_task"].values()) == 12
    # the same per-(task, seed) cache files, byte for byte, each written by one rank
    files = sorted(p.relative_to(one_dir) for p in (one_dir / "cache").rglob("*.json"))
    assert len(files) == 12
    assert files == sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache").rglob("*.json"))
    assert all((one_dir / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)
    # rank 0 prints the tables and its progress; rank 1 prints neither
    assert proc.stdout.count("per task (x100)") == 1
    assert "on 2 ranks" in proc.stderr
    progress = re.findall(r"eval synthetic \(rank (\d) of 2\): (\d+)/(\d+) pairs", proc.stderr)
    assert progress and {rank for rank, *_ in progress} == {"0"}
    assert progress[-1][1] == progress[-1][2] == "6"  # 12 pairs, balanced: 6 on rank 0
    print(
        f"\nbench: eval of 12 (task, seed) pairs: 1 process {one_seconds:.1f} s "
        f"(evaluate {one['wall_seconds']:.2f} s), 2 ranks {two_seconds:.1f} s "
        f"(evaluate {two['wall_seconds']:.2f} s)"
    )


def test_progress_lines_when_stderr_is_a_file(one_process):
    _, _, stderr, _ = one_process
    lines = re.findall(
        r"^\[\d\d:\d\d:\d\d\] eval synthetic: (\d+)/12 pairs, (\d+)/(\d+) sequences "
        r"\([\d.]+%\), elapsed \d+:\d\d:\d\d, (ETA \d+:\d\d:\d\d|ETA \?|done)$",
        stderr,
        flags=re.MULTILINE,
    )
    assert [int(done) for done, *_ in lines] == [4, 8, 12]  # --log-every 4, then the end
    assert [tail.split()[0] for *_, tail in lines] == ["ETA", "ETA", "done"]
    assert lines[-1][1] == lines[-1][2]  # every sequence counted


def test_every_figure_in_full_at_80_columns(one_process):
    out, stdout, _, _ = one_process
    result = json.loads((out / RESULT).read_text())
    assert max(len(line) for line in stdout.splitlines()) <= 80
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    for task, entry in result["per_task"].items():
        scores = [f"{100 * entry['seeds'][s]['score']:.2f}" for s in ("100", "13")]
        cell = f"{100 * entry['average']:.2f}/{100 * entry['worst']:.2f}"
        assert rows[task][-3:] == [cell, *scores]  # the task's name and figures, whole
    cell = f"{100 * result['average']:.2f}/{100 * result['worst']:.2f}"
    assert stdout.count(cell) == 2  # the "mean over tasks" row and the summary table
    assert rows["tiny"] == ["tiny", cell]
