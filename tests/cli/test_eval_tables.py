"""The eval and compare tables at 80 columns: no figure and no name cut (docs/evaluation.md,
"Tables")."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from launcher.eval_cmd import paper_table, per_task_table
from tests.helpers import maml_ds

# MetaICL's longest test task names and settings
TASKS = (
    "ethos-directed_vs_generalized",
    "tweet_eval-stance_feminist",
    "medical_questions_pairs",
    "poem_sentiment",
    "climate_fever",
    "superglue-cb",
)
SETTINGS = (
    "hr_to_lr",
    "class_to_class",
    "non_class_to_class",
    "qa_to_qa",
    "non_qa_to_qa",
    "non_nli_to_nli",
    "non_paraphrase_to_paraphrase",
)
LABELS = ("No ICL", "MetaICL", "MAML-2-4", "Channel MAML-2-4 +adapt")
CELL = re.compile(r"\d+\.\d\d/\d+\.\d\d")


def _render(tables, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    for table in tables:
        console.print(table)
    return console.file.getvalue()


def _score(i: int) -> float:
    return (1000 + 737 * i) % 10000 / 10000  # 4 digits: 24.75 style figures, some 100.00


def _fake_result(seeds=(100, 13, 21, 42, 87)) -> SimpleNamespace:
    per_task = {
        task: {
            seed: SimpleNamespace(score=_score(7 * t + s), metric="macro-f1" if t else "accuracy")
            for s, seed in enumerate(seeds)
        }
        for t, task in enumerate(TASKS)
    }
    per_seed = {seed: sum(per_task[t][seed].score for t in TASKS) / len(TASKS) for seed in seeds}
    return SimpleNamespace(
        label="Channel MAML-2-4 +adapt",
        column="non_paraphrase_to_paraphrase (unseen)",
        options=SimpleNamespace(seeds=seeds),
        tasks=TASKS,
        per_task=per_task,
        aggregate=SimpleNamespace(
            per_seed=per_seed,
            average=sum(per_seed.values()) / len(seeds),
            worst=min(per_seed.values()),
        ),
    )


@pytest.mark.parametrize("width", [80, 60, 200])
def test_per_task_table_keeps_every_figure_and_name(width):
    result = _fake_result()
    text = _render(per_task_table(result, width), width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width and "…" not in text
    for task in TASKS:
        tokens = [tok for line in lines if line.startswith(task + " ") for tok in line.split()]
        scores = [result.per_task[task][s].score for s in result.options.seeds]
        expected = [f"{100 * v:.2f}" for v in scores]
        expected.append(f"{100 * sum(scores) / len(scores):.2f}/{100 * min(scores):.2f}")
        assert tokens[0] == task and all(e in tokens for e in expected), (task, tokens)
    agg = result.aggregate
    assert f"{100 * agg.average:.2f}/{100 * agg.worst:.2f}" in text
    assert "acc: accuracy" in text and "F1: macro-f1" in text
    if width == 200:
        assert "(continued)" not in text  # one table when it fits


def test_paper_table_folds_settings_into_blocks():
    rows = [
        (label, f"{s} ({scope})", _score(i), _score(i + 3) / 2, label == "No ICL")
        for i, (label, s, scope) in enumerate(
            (label, s, scope) for label in LABELS for s in SETTINGS for scope in ("all", "unseen")
        )
    ]
    text = _render(paper_table(rows, "average/worst over seeds (x100)", 80))
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "(continued)" in text
    for label, column, average, worst, single in rows:
        cell = f"{100 * average:.2f}" if single else f"{100 * average:.2f}/{100 * worst:.2f}"
        assert re.search(rf"(?<![\d.]){re.escape(cell)}(?![\d/])", text), (label, column, cell)
    for setting in SETTINGS:
        assert setting in text.split()


def test_compare_at_80_columns(tmp_path, monkeypatch):
    """`COLUMNS=80 maml-ds compare` of 28 results: every average/worst in full."""
    expected = []
    for i, (label, setting) in enumerate((a, s) for a in LABELS for s in SETTINGS):
        seeds = [100, 13, 21, 42, 87]
        average, worst = _score(i), _score(i) * 0.75
        record = {
            "format": "maml-ds-eval",
            "label": label,
            "column": f"{setting} (all)",
            "average": average,
            "worst": worst,
            "seeds": seeds,
            "options": {"use_demonstrations": label != "No ICL"},
        }
        (tmp_path / f"r{i:02d}.json").write_text(json.dumps(record))
        single = label == "No ICL"
        expected.append(
            f"{100 * average:.2f}" if single else f"{100 * average:.2f}/{100 * worst:.2f}"
        )
    monkeypatch.setenv("COLUMNS", "80")
    proc = maml_ds("compare", tmp_path)
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in proc.stdout
    cells = CELL.findall(proc.stdout)
    assert sorted(cells) == sorted(c for c in expected if "/" in c)
    for cell in expected:
        assert re.search(rf"(?<![\d.]){re.escape(cell)}(?![\d/])", proc.stdout), cell
    # the win-rate matrix: every off-diagonal cell whole, "wins/settings (rate)"
    assert len(re.findall(r"\b\d/7 \(\d\.\d\d\)", proc.stdout)) == len(LABELS) * (len(LABELS) - 1)
