"""`maml-ds study` end to end: the quick study stopped midway and continued, its tables at 80
columns and its summary; the paper preset's dry run; user errors and a failing step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from launcher.study_cmd import study_command
from maml_ds.study import StudyState
from tests.helpers import free_port

app = typer.Typer()
app.command()(study_command)
runner = CliRunner(env={"COLUMNS": "80"})


def invoke(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def start_model(tokenizer_dir, tmp_path_factory) -> Path:
    """A random-init tiny GPT-2 with its tokenizer, as `maml-ds export` writes one."""
    from maml_ds.models import build_model, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("start")
    build_model("tiny", vocab_size=len(tokenizer), seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.rglob("*"))
    }


def _cell(row: dict) -> str:
    if row["label"] == "No ICL" or len(row["per_seed"]) == 1:
        return f"{100 * row['average']:.2f}"
    return f"{100 * row['average']:.2f}/{100 * row['worst']:.2f}"


def test_quick_study_stopped_midway_continues_and_reports(tmp_path, synth_dir, start_model):
    out = tmp_path / "study"
    args = ("--quick", "--out", out, "--data", synth_dir, "--starting-model", start_model,
            "--master-port", free_port())  # fmt: skip
    first = invoke(*args, "--stop-after", "3", code=3)
    assert "stopped after 3 step(s)" in first and not (out / "summary.json").exists()
    state = json.loads((out / "state.json").read_text())["finished"]
    finished = list(state)
    assert finished == [
        "baseline.synthetic.direct.no-icl.unseen",
        "baseline.synthetic.direct.raw-lm.unseen",
        "train.complete.synthetic.metaicl",
    ]

    second = invoke(*args)
    lines = second.splitlines()
    for n, step_id in enumerate(finished):
        assert lines[n] == f"[{n + 1}/6] done earlier  {step_id}"
        assert (out / "logs" / f"{step_id}.log").read_text().count("maml-ds study: ") == 1
    assert lines[3].endswith("eval.complete.synthetic.metaicl.unseen")
    assert lines[5].endswith("eval.complete.synthetic.maml-2-1.unseen")

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["results"]
    assert [r["label"] for r in rows] == ["No ICL", "Raw LM", "MetaICL", "MAML-2-1"]
    for row in rows:
        assert row["column"] == "synthetic (unseen)" and set(row["per_seed"]) == {"100", "13"}
        seeds = list(row["per_seed"].values())
        assert row["min"] == min(seeds) and row["max"] == max(seeds) and row["std"] >= 0
        assert _cell(row) in second, f"{row['label']}: {_cell(row)} not printed in full"
    margins = {(m["label"], m["family"]) for m in summary["margins_over_raw_lm"]}
    families = {"keyword", "topic", "attribute", "nli", "paraphrase", "qa", "overall"}
    assert margins == {(label, f) for label in ("MetaICL", "MAML-2-1") for f in families}
    assert summary["findings"] and summary["missing"] == []
    assert summary["win_rates"]["complete"]["MAML-2-1"]["MetaICL"]["settings"] == 1
    assert all(len(line) <= 80 for line in lines) and "…" not in second
    assert "margin over Raw LM" in second and "win rate of row over column" in second
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    for step in ("train.complete.synthetic.metaicl", "train.complete.synthetic.maml-2-1"):
        run = out / "runs" / step.replace("train.", "").replace(".", "-")
        assert (run / "final" / "maml_ds_export.json").is_file()

    before = _snapshot(out)
    listing = invoke("--out", out, "--dry-run")  # the folder's own plan, every step done
    assert listing.count("  (done)") == 6 and _snapshot(out) == before


def test_paper_dry_run_lists_every_command_and_writes_nothing(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    text = invoke("--preset", "paper", "--data", tmp_path / "metaicl", "--out", existing,
                  "--dry-run")  # fmt: skip
    commands = [line.strip() for line in text.splitlines() if line.startswith("    maml-ds ")]
    assert text.startswith("study plan (paper preset): 368 steps")
    assert len(commands) == 368
    launches = [c for c in commands if c.startswith("maml-ds launch")]
    assert len(launches) == 90 and all(
        "--preset v100-32gb --nodes 1 --gpus 8" in c for c in launches
    )
    assert sum("--train-fraction 0.1" in c for c in launches) == 42 + 6
    assert sum(c.startswith("maml-ds adapt") for c in commands) == 42
    assert any(
        "--inner-optimizer sgd --outer-optimizer sgd --no-shared-moments" in c for c in launches
    )
    assert "does not exist yet" in text
    assert list(tmp_path.iterdir()) == [existing] and list(existing.iterdir()) == []


def test_user_errors_exit_2(tmp_path, synth_dir, start_model):
    assert "unknown study preset 'gpu'" in invoke("--preset", "gpu", code=2)
    assert "--quick is the quick preset" in invoke("--quick", "--preset", "paper", code=2)
    assert "is not one of the synthetic" in invoke("--preset", "paper", "--dry-run", code=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a study folder" in invoke("--quick", "--out", other, "--dry-run", code=2)
    assert "is a file" in invoke("--quick", "--out", other / "notes.txt", code=2)
    missing = invoke("--quick", "--out", tmp_path / "new", "--data", tmp_path / "none", code=2)
    assert "does not exist" in missing and not (tmp_path / "new").exists()
    study = tmp_path / "study"
    args = ("--quick", "--out", study, "--data", synth_dir, "--starting-model", start_model)
    invoke(*args, "--stop-after", "1", code=3)  # the first baseline only
    changed = invoke(*args, "--seeds", "1,2", code=2)
    assert "ran other commands" in changed and f"maml-ds study --out {study}" in changed


def test_a_failing_step_stops_the_study_with_one_line(tmp_path, synth_dir):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    out = tmp_path / "study"
    text = invoke("--quick", "--out", out, "--data", synth_dir, "--starting-model", not_a_model,
                  code=1)  # fmt: skip
    step = "baseline.synthetic.direct.no-icl.unseen"
    log = out / "logs" / f"{step}.log"
    message = " ".join(text.split())
    assert f"step {step} failed (exit code 2); log: {log}; rerun it alone: maml-ds eval" in message
    assert f"then continue the study: maml-ds study --out {out}" in message
    assert "not a maml-ds run folder" in log.read_text()
    assert StudyState.load(out).finished == {}


@pytest.mark.slow
def test_quick_study_with_its_own_suite_and_starting_model(tmp_path):
    """`maml-ds study --quick` as CI runs it: it writes the suite and the starting model too."""
    out = tmp_path / "study"
    text = invoke("--quick", "--out", out, "--master-port", free_port())
    assert [line.split()[-1] for line in text.splitlines()[:3]] == [
        "data",
        "start.init",
        "start.export",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["results"]] == ["No ICL", "Raw LM", "MetaICL", "MAML-2-1"]
    start = str(out / "start" / "model")
    plan = json.loads((out / "plan.json").read_text())
    assert all(start in s["argv"] for s in plan["steps"] if s["kind"] == "train")
