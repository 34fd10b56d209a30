"""`maml-ds train` end to end on a tiny model: the loss falls, resume is exact, errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from maml_ds.config import RunConfig
from tests.helpers import maml_ds

COMMON = ["--model", "tiny", "--k", "4", "--micro-batch-size", "4", "--max-examples-per-task", "40"]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["direct", "channel"])
def test_metaicl_loss_falls(synth_dir, tokenizer_dir, tmp_path, variant):
    run = tmp_path / "run"
    maml_ds("train", "--method", "metaicl", "--data", synth_dir, "--tokenizer", tokenizer_dir,
            "--out", run, "--max-steps", "40", "--lr", "3e-3", "--variant", variant,
            *COMMON)  # fmt: skip
    losses = [r["loss"] for r in history(run)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # channel scores the made-up input words (harder to predict than a label word)
    assert last < (0.6 if variant == "direct" else 0.8) * first, (first, last)
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step40"
    assert json.loads((run / "config.json").read_text())["max_steps"] == 40


@pytest.mark.parametrize(
    "method, zero",
    [
        # MetaICL at ZeRO-2 is also resumed after a SIGKILL in test_preemption.py (default suite)
        pytest.param("metaicl", "2", marks=pytest.mark.slow),
        # the same 1-rank maml-2-2 stop + resume is test_run_record's resume-alone test
        pytest.param("maml-2-2", "1", marks=pytest.mark.slow),
    ],
)
def test_resume_continues_exactly(synth_dir, tokenizer_dir, tmp_path, method, zero):
    args = ["--method", method, "--data", synth_dir, "--tokenizer", tokenizer_dir,
            "--max-steps", "4", "--zero", zero, "--lr", "1e-3", "--inner-lr", "1e-3",
            *COMMON]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    maml_ds("train", *args, "--out", straight)
    maml_ds("train", *args, "--out", split, "--stop-after", "2")
    assert not (split / "final").exists()  # not finished: no export yet
    maml_ds("train", *args, "--out", split, "--resume")
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    # exactly the remaining updates ran, with the same losses
    assert [r["step"] for r in history(split)] == [1, 2, 3, 4]
    assert [r["loss"] for r in history(split)] == [r["loss"] for r in history(straight)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "reptile"], "unknown method 'reptile'; valid forms"),
        (["--method", "maml-2-0"], "n (tasks per meta-update) must be >= 1"),
        (["--method", "maml-3-2"], "must be an even number >= 2 (k >= 1)"),
        (["--method", "maml-2-2", "--zero", "3", "--second-order", "exact"],
         "--second-order exact needs double backward, which ZeRO-3"),
        (["--method", "metaicl", "--setting", "nope"], "nope"),
    ],
)  # fmt: skip
def test_start_up_errors(synth_dir, tokenizer_dir, tmp_path, extra, message):
    proc = maml_ds("train", "--data", synth_dir, "--tokenizer", tokenizer_dir,
                   "--out", tmp_path / "r", *COMMON, *extra, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr


def test_existing_run_is_never_overwritten_and_resume_needs_a_checkpoint(
    synth_dir, tokenizer_dir, tmp_path
):
    run = tmp_path / "r"
    args = ["--method", "metaicl", "--data", synth_dir, "--tokenizer", tokenizer_dir,
            "--out", run, "--max-steps", "1", *COMMON]  # fmt: skip
    proc = maml_ds("train", *args, "--resume", check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    maml_ds("train", *args)
    before = (run / "checkpoints" / "step1").stat().st_mtime_ns
    proc = maml_ds("train", *args, check=False)
    assert proc.returncode == 2 and "already holds checkpoints: pass --resume" in proc.stderr
    assert (run / "checkpoints" / "step1").stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------
# Flags derived from RunConfig (launcher/config_flags.py)
# --------------------------------------------------------------------------------------------


def test_every_config_field_is_one_flag_with_its_docstring():
    import dataclasses

    from typer.testing import CliRunner

    from launcher.cli import app
    from launcher.config_flags import FLAGS

    def leaves(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    assert [flag.key for flag in FLAGS] == list(leaves(RunConfig()))
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    unwrapped = "".join(result.output.split())  # help wraps lines at hyphens too
    for flag in FLAGS:
        assert flag.help.split("[default")[0].strip(), f"{flag.key} has no docstring"
        assert flag.names[0] in text and "".join(flag.help.split()) in unwrapped, flag.key
    # today's names where the flag is not the field's name, and the bool switches
    for name in ("--k", "--zero", "--data", "--out", "--model", "--lr, --outer-lr",
                 "--no-shared-moments", "--precision", "--micro-batch-size"):  # fmt: skip
        assert name in text
    assert "[default: 16]" in text and "<fp32|fp16|bf16>" in text


def test_flags_override_a_config_file(tmp_path):
    from launcher.config_flags import parse_options
    from launcher.train_cmd import build_run_config, train_command

    base = RunConfig(method="maml-2-2")
    base.data.num_demonstrations = 8
    base.save(tmp_path / "config.json")
    args = ["--outer-lr", "0.5", "--no-shared-moments", "--betas", "0.8", "0.9", "--zero", "2"]
    cfg = build_run_config(tmp_path / "config.json", parse_options(train_command, "train", args))
    assert cfg.optim.lr == 0.5 and cfg.meta.shared_moments is False
    assert cfg.optim.betas == (0.8, 0.9) and cfg.deepspeed.zero_stage == 2
    assert cfg.data.num_demonstrations == 8 and cfg.method == "maml-2-2"  # not given: kept


def test_a_choice_typo_lists_the_valid_values(tmp_path):
    from typer.testing import CliRunner

    from launcher.cli import app

    result = CliRunner().invoke(app, ["train", "--precision", "fp8", "--out", str(tmp_path)])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())
    assert "'fp8' is not one of 'fp32', 'fp16', 'bf16'" in text


def test_config_problems_name_real_flags():
    """Every --flag that a RunConfig problem tells the user to pass exists."""
    import re

    import maml_ds.config
    from launcher.config_flags import FLAGS

    named = set(re.findall(r"--[a-z][a-z0-9-]*", Path(maml_ds.config.__file__).read_text()))
    flags = {name for flag in FLAGS for name in flag.names}
    flags |= {"--no-" + n.removeprefix("--") for f in FLAGS if f.is_bool for n in f.names}
    assert named - flags == set()
