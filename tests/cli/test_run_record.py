"""A run folder is a record nothing overwrites by accident (`maml-ds train`, tiny GPT-2, CPU):
`--resume` alone continues the run's own config bit-exactly, refused changes leave every byte in
place, safe changes are applied and recorded, a dangling or empty `latest` holds a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from maml_ds.training.zero_layout import checkpoint_client_state
from tests.helpers import maml_ds

COMMON = ["--model", "tiny", "--k", "4", "--micro-batch-size", "4", "--max-examples-per-task", "40"]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def refused_in_process(*args: str):
    """`maml-ds train ARGS` in this process, for a start refused before any rank starts (the
    resume rules run first): exit code 2, nothing written."""
    from typer.testing import CliRunner

    from launcher.cli import app

    result = CliRunner().invoke(app, ["train", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    return result


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder, by path: the record a refused command must leave alone."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps(synth_dir, tokenizer_dir, tmp_path_factory) -> Path:
    """A MetaICL run at ZeRO-2 stopped after 2 of 4 updates (a checkpoint at step 2)."""
    run = tmp_path_factory.mktemp("record") / "run"
    maml_ds("train", "--method", "metaicl", "--data", synth_dir, "--tokenizer", tokenizer_dir,
            "--out", run, "--max-steps", "4", "--zero", "2", "--lr", "1e-3", "--stop-after", "2",
            *COMMON)  # fmt: skip
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_resume_alone_continues_the_run_config_exactly(synth_dir, tokenizer_dir, tmp_path):
    args = ["--method", "maml-2-2", "--data", synth_dir, "--tokenizer", tokenizer_dir,
            "--max-steps", "4", "--zero", "2", "--lr", "1e-3", "--inner-lr", "1e-3",
            "--seed", "7", *COMMON]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    maml_ds("train", *args, "--out", straight)
    maml_ds("train", *args, "--out", split, "--stop-after", "2")
    record = (split / "config.json").read_bytes()
    proc = maml_ds("train", "--out", split, "--resume")  # no other flag: the run's own config
    assert "change(s)" not in proc.stderr
    assert (split / "config.json").read_bytes() == record
    assert [r["step"] for r in history(split)] == [1, 2, 3, 4]
    assert [r["loss"] for r in history(split)] == [r["loss"] for r in history(straight)]
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_refused_changes_are_named_and_leave_the_run_untouched(two_steps, tmp_path):
    run = copy_of(two_steps, tmp_path)
    before = snapshot(run)
    changes = {  # flag: (new value(s), the saved value as the message prints it)
        "--method": (["maml-2-2"], "'metaicl'"),
        "--model": (["tiny-128"], "'tiny'"),
        "--variant": (["channel"], "'direct'"),
        "--zero": (["3"], "2"),
        "--k": (["8"], "4"),
        "--data": ([str(tmp_path / "other")], None),
        "--setting": (["synth_qa_to_qa"], "'synthetic'"),
        "--seed": (["1"], "100"),
        "--precision": (["bf16"], "'fp32'"),
        "--betas": (["0.8", "0.9"], "(0.9, 0.999)"),
        "--eps": (["1e-6"], "1e-08"),
        "--weight-decay": (["0.1"], "0.0"),
        "--inner-lr": (["1e-3"], "1e-05"),
        "--no-shared-moments": ([], "True"),
        "--gradient-clipping": (["0.5"], "None"),
    }
    args = [a for flag, (values, _) in changes.items() for a in (flag, *values)]
    result = refused_in_process("--out", run, "--resume", "--max-steps", "6", *args)
    text = " ".join(result.stderr.split())
    assert "nothing was written" in text
    for flag, (_, old) in changes.items():
        assert f"{flag.replace('--no-', '--')} (" in text, flag
        if old is not None:
            assert f") {old} -> " in text, (flag, old)
    assert "max_steps" not in text  # a safe change is not refused
    assert snapshot(run) == before


def test_a_changed_world_size_is_refused_at_zero_2(two_steps, tmp_path):
    run = copy_of(two_steps, tmp_path)
    manifest = run / "checkpoints" / "step2" / "manifest.json"
    saved = json.loads(manifest.read_text())
    saved["world_size"] = 2  # as if 2 ranks had saved it
    manifest.write_text(json.dumps(saved))
    before = snapshot(run)
    text = " ".join(refused_in_process("--out", run, "--resume").stderr.split())
    assert "world size 2 -> 1: ZeRO 1-3 split the optimizer state" in text
    assert snapshot(run) == before


def test_safe_changes_are_applied_and_recorded(two_steps, tmp_path):
    run = copy_of(two_steps, tmp_path)
    proc = maml_ds("train", "--out", run, "--resume", "--max-steps", "5", "--save-every", "1",
                   "--log-every", "1", "--lr", "5e-4")  # fmt: skip
    text = " ".join(proc.stderr.split())
    assert "--lr (optim.lr) 0.001 -> 0.0005" in text
    assert "--max-steps (max_steps) 4 -> 5" in text and "LR schedule rebuilt" in text
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["max_steps"], recorded["save_every"], recorded["log_every"]) == (5, 1, 1)
    assert recorded["optim"]["lr"] == 5e-4
    assert [r["step"] for r in history(run)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == [
        "step2", "step3", "step4", "step5"]  # fmt: skip
    # the lr is applied, not just recorded: the schedule continues at 5e-4 x its linear factor
    step4 = checkpoint_client_state(run / "checkpoints" / "step4")
    assert step4["config"]["optim"]["lr"] == 5e-4
    assert step4["lr_scheduler"]["base_lrs"] == [5e-4]
    assert step4["lr_scheduler"]["_last_lr"] == [5e-4 * (5 - 4) / 5]


def test_a_failed_start_writes_no_record(two_steps, synth_dir, tokenizer_dir, tmp_path):
    run = copy_of(two_steps, tmp_path)
    for tag in (run / "checkpoints").glob("step*"):
        for f in tag.iterdir():
            f.unlink() if f.is_file() else shutil.rmtree(f)  # every checkpoint broken
    before = snapshot(run)
    proc = maml_ds("train", "--out", run, "--resume", "--max-steps", "6", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert snapshot(run) == before  # config.json still says max_steps 4
    new = tmp_path / "new"
    proc = maml_ds("train", "--data", synth_dir, "--tokenizer", tokenizer_dir, "--out", new,
                   "--setting", "nope", *COMMON, check=False)  # fmt: skip
    assert proc.returncode == 2 and not (new / "config.json").exists()


# an empty `latest` holds a run by the same rule (checkpoint.holds_checkpoints, tested with an
# empty `latest` in tests/engine/test_checkpoint_fallback.py): on demand only
@pytest.mark.parametrize("latest", ["step9", pytest.param("", marks=pytest.mark.slow)])
def test_a_dangling_or_empty_latest_holds_a_run(synth_dir, tokenizer_dir, tmp_path, latest):
    run = tmp_path / "run"
    (run / "checkpoints" / "step1").mkdir(parents=True)
    (run / "checkpoints" / "step1" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (run / "checkpoints" / "latest").write_text(latest)
    (run / "config.json").write_text('{"the": "run record"}\n')
    before = snapshot(run)
    args = ["--method", "metaicl", "--data", synth_dir, "--tokenizer", tokenizer_dir]
    proc = maml_ds("train", *args, "--out", run, "--max-steps", "1", *COMMON, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds checkpoints: pass --resume" in proc.stderr
    assert snapshot(run) == before
