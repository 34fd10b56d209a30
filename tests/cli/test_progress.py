"""Training progress: plain lines with the ETA when the output is not a terminal, a bar on one."""

from __future__ import annotations

import io
import re

from maml_ds.training.progress import TrainProgress, format_duration
from tests.helpers import REPO, env

LINE = re.compile(
    r"^\[\d\d:\d\d:\d\d\] metaicl update (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\S+)  "
    r"(\d+\.\d) prompts/s  elapsed (\d+:\d\d:\d\d)  ETA (\d+:\d\d:\d\d)$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_n_updates_with_the_eta():
    clock, out = Clock(), io.StringIO()
    progress = TrainProgress(
        "metaicl", total=100, start=40, last=60, log_every=5, stream=out, is_terminal=False,
        clock=clock,
    )  # fmt: skip
    with progress:
        for step in range(41, 61):
            clock.now += 30.0  # 30 s per update
            progress.update(step, loss=2.0, lr=1e-5, prompts_per_s=3.0, extra={})
    lines = out.getvalue().splitlines()
    steps = [int(LINE.match(line).group(1)) for line in lines]
    assert steps == [41, 45, 50, 55, 60]  # the first of this invocation, every 5, the last
    first, middle = LINE.match(lines[0]), LINE.match(lines[2])
    assert first.group(6, 7) == ("0:00:30", "0:09:30")  # 19 updates left at 30 s each
    assert middle.group(6, 7) == ("0:05:00", "0:05:00")
    assert LINE.match(lines[-1]).group(7) == "0:00:00"
    assert middle.group(3, 4, 5) == ("2.0000", "1e-05", "3.0")


def test_extra_values_and_rank_zero_only():
    out = io.StringIO()
    with TrainProgress(
        "maml-2-2", total=2, start=0, last=2, log_every=1, stream=out, is_terminal=False
    ) as progress:
        progress.update(1, loss=1.0, lr=0.1, prompts_per_s=1.0, extra={"query_loss": 0.5})
    assert "  query_loss 0.5  elapsed" in out.getvalue()
    quiet = io.StringIO()
    with TrainProgress(
        "m", total=2, start=0, last=2, log_every=1, stream=quiet, is_terminal=False, enabled=False
    ) as progress:
        progress.update(1, loss=1.0, lr=0.1, prompts_per_s=1.0, extra={})
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_bar_not_lines():
    out = io.StringIO()
    with TrainProgress(
        "metaicl", total=3, start=0, last=3, log_every=1, stream=out, is_terminal=True
    ) as progress:
        for step in (1, 2, 3):
            progress.update(step, loss=1.0, lr=0.1, prompts_per_s=1.0, extra={})
    assert not any(LINE.match(line) for line in out.getvalue().splitlines())
    assert "3/3" in out.getvalue()


def test_format_duration():
    assert format_duration(3725.2) == "1:02:05" and format_duration(0) == "0:00:00"


def test_training_into_a_file_logs_lines_with_the_eta(synth_dir, tmp_path):
    """`maml-ds train` with stdout and stderr in a file (a SLURM log): periodic lines."""
    import subprocess

    from tests.helpers import BIN

    log = tmp_path / "train.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            [str(BIN / "maml-ds"), "train", "--method", "metaicl", "--data", str(synth_dir),
             "--model", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "5", "--k", "4",
             "--max-examples-per-task", "40", "--log-every", "2"],
            env=env(), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    matches = [LINE.match(line) for line in text.splitlines()]
    lines = [m for m in matches if m]
    assert [int(m.group(1)) for m in lines] == [1, 2, 4, 5]
    assert all(m.group(2) == "5" for m in lines)
    assert lines[-1].group(7) == "0:00:00"
