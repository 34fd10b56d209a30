"""`maml-ds data import | build | check` end to end (in-process), and `eval` of imported tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from maml_ds.data.reader import task_file
from maml_ds.data.registry import REGISTRY
from maml_ds.data.tasks import load_setting
from tests.unit.test_data_import import CLIMATE_MAP, REAL, fake_sources  # noqa: F401 (fixture)

runner = CliRunner(env={"COLUMNS": "200"})  # rich tables unwrapped
TASKS = ["poem_sentiment", "medical_questions_pairs", "climate_fever"]
K = "4"


def cli(*args: str | Path, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def import_real(out: Path) -> None:
    poem = REAL / "poem_sentiment"
    cli("data", "import", poem / "train.tsv", "--test", poem / "dev.tsv",
        "--columns", "id,verse,label", "--task", "poem_sentiment", "--out", out,
        "--input", "{verse}", "--label", "label", "--label-map=-1=negative,0=no_impact,1=positive",
        "--k", K)  # fmt: skip
    cli("data", "import", REAL / "medical_questions_pairs" / "mqp.csv",
        "--columns", "dr_id,question_1,question_2,label", "--task", "medical_questions_pairs",
        "--out", out, "--input", "question 1: {question_1} [SEP] question 2: {question_2}",
        "--label", "label", "--label-map", "0=Similar,1=Dissimilar", "--k", K)  # fmt: skip
    out_text = cli("data", "import", REAL / "climate_fever" / "climate-fever.jsonl",
        "--task", "climate_fever", "--out", out, "--input", "{claim}", "--label", "claim_label",
        "--label-map", CLIMATE_MAP, "--k", K)  # fmt: skip
    assert "24 lines to draw demonstrations from, 6 test lines (held out" in out_text
    setting = out / "config" / "real.json"
    setting.write_text(json.dumps({"train": [], "test": TASKS, "unseen_domain_test": TASKS}))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported")
    import_real(out)
    return out


def test_import_then_check_passes(imported):
    out = cli("data", "check", imported, "--setting", "real", "--k", K)
    assert "ready for setting 'real'" in out
    assert re.search(r"poem_sentiment .*100:4, 13:4, 21:4, 42:4, 87:4 .* 12 ", out)


def test_import_reports_dropped_rows_and_bad_input(tmp_path):
    poem = REAL / "poem_sentiment"
    common = ("--columns", "id,verse,label", "--task", "poem", "--out", tmp_path, "--k", K)
    out = cli("data", "import", poem / "train.tsv", *common, "--input", "{verse}",
              "--label", "label", "--label-map=-1=negative,0=no_impact,1=positive")  # fmt: skip
    assert "37/40 rows kept; dropped: 3 x label '2' is not in the label map" in out
    out = cli("data", "import", poem / "train.tsv", *common[:-2], "--input", "{verse}",
              "--label", "label", "--label-map=-1=negative,0=no_impact,1=positive",
              "--meta-train")  # fmt: skip
    assert "29 meta-training lines (k=16384) (held out: 20% of the rows, seed 42)" in out
    assert len(task_file(tmp_path, "poem", 16384, 100, "train").read_text().splitlines()) == 29
    out = cli("data", "import", poem / "train.tsv", *common, "--input", "{rhyme}",
              "--label", "label", code=2)  # fmt: skip
    assert "error: " in out and "unknown field 'rhyme'" in out


def test_check_fails_with_the_list_of_problems(imported, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(imported, data)
    task_file(data, "climate_fever", 4, 87, "train").unlink()
    task_file(data, "poem_sentiment", 4, 13, "test").write_text("")
    out = cli("data", "check", data, "--setting", "real", "--k", K, code=2)
    assert "missing file for task 'climate_fever'" in out
    assert "poem_sentiment_4_13_test.jsonl: the file has no examples" in out
    assert "error: 2 problem(s) in" in out


def test_build_list_and_offline_build(tmp_path, fake_sources):  # noqa: F811
    out = cli("data", "build", "--list", "--setting", "hr_to_lr")
    hr_to_lr = load_setting("hr_to_lr")
    num_registered = len(set(hr_to_lr.all_tasks()) & set(REGISTRY))
    assert f"hr_to_lr: {num_registered} of 87 tasks have an entry" in out and "no entry yet" in out
    assert out.index("financial_phrasebank") < out.index("glue-mrpc")
    sources = [f"--source=glue-rte={fake_sources['glue-rte']}", f"--source=sick={tmp_path}/x"]
    build = ("data", "build", "--tasks", "glue-rte,sick", "--out", tmp_path / "d", "--k", K)
    out = cli(*build, *sources, code=1)
    assert (
        "1 built, 0 already complete, 1 failed" in out
        and "rerun the same command to retry them" in out
    )
    sources[1] = f"--source=sick={fake_sources['sick']}"
    out = cli(*build, *sources)
    assert "glue-rte: complete already, skipped" in out and "1 built, 1 already complete" in out


def test_build_a_setting_target_then_meta_training_tasks(tmp_path, fake_sources):  # noqa: F811
    setting = tmp_path / "mini.json"
    setting.write_text(json.dumps({"train": ["glue-sst2", "glue-qnli"], "test": ["glue-rte"]}))
    sources = [f"--source={t}={fake_sources[t]}" for t in ("glue-sst2", "glue-qnli", "glue-rte")]
    out = cli("data", "build", "--setting", setting, "--out", tmp_path / "d", "--k", K, *sources)
    assert "3 built, 0 already complete, 0 failed" in out
    assert task_file(tmp_path / "d", "glue-rte", 4, 87, "test").is_file()
    assert task_file(tmp_path / "d", "glue-sst2", 16384, 100, "train").is_file()
    out = cli("data", "check", tmp_path / "d", "--setting", setting, "--k", K, "--seeds", "100,87")
    assert "2 meta-training tasks, 32 lines" in out and "ready for setting 'mini'" in out


def test_eval_scores_imported_tasks(imported, tokenizer_dir, tmp_path):
    """`maml-ds eval` reads the imported folder and scores every task and seed."""
    cli("eval", "--model", "tiny", "--tokenizer", tokenizer_dir, "--data", imported,
        "--setting", "real", "--seeds", "100,13", "--k", K, "--out", tmp_path,
        "--device", "cpu", "--batch-size", "8")  # fmt: skip
    (result,) = tmp_path.glob("eval_real_*.json")
    per_task = json.loads(result.read_text())["per_task"]
    assert list(per_task) == TASKS
    assert [per_task[t]["num_examples"] for t in TASKS] == [12, 8, 6]
    for task in TASKS:
        assert per_task[task]["metric"] == "macro-f1"
        assert set(per_task[task]["seeds"]) == {"100", "13"}
        assert all(0 <= s["score"] <= 1 for s in per_task[task]["seeds"].values())
