"""`data check`: every problem a run would trip on, each named with its file/task/seed."""

from __future__ import annotations

import json
import shutil

import pytest

from maml_ds.data.check import check_setting
from maml_ds.data.reader import task_file
from tests.unit.test_data_import import K, import_real, write_setting

TASKS = ["poem_sentiment", "medical_questions_pairs", "climate_fever"]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    import_real(out)
    write_setting(out, "real", TASKS)
    return out


@pytest.fixture
def data_dir(good_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(good_dir, out)
    return out


def test_good_folder_passes(good_dir):
    report = check_setting(good_dir, "real", k=K)
    assert report.ok and report.warnings == []
    assert report.test["medical_questions_pairs"].num_test == 8


def test_synthetic_suite_passes(synth_dir):
    report = check_setting(synth_dir, "synthetic", k=16)
    assert report.problems == []
    assert report.train and all(c.num_train > 0 for c in report.train.values())


def _only_problem(data_dir) -> str:
    report = check_setting(data_dir, "real", k=K)
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_missing_seed_file(data_dir):
    path = task_file(data_dir, "climate_fever", K, 42, "train")
    path.unlink()
    problem = _only_problem(data_dir)
    assert f"missing file for task 'climate_fever': {path}" in problem


def test_malformed_line_names_file_and_line(data_dir):
    path = task_file(data_dir, "poem_sentiment", K, 13, "test")
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    assert _only_problem(data_dir).startswith(f"{path}:3: not valid JSON")


def test_output_outside_the_options(data_dir):
    path = task_file(data_dir, "medical_questions_pairs", K, 100, "train")
    lines = path.read_text().splitlines()
    line = json.loads(lines[1])
    line["output"] = "Maybe"
    lines[1] = json.dumps(line)
    path.write_text("\n".join(lines) + "\n")
    assert _only_problem(data_dir) == (
        f"{path}:2: output 'Maybe' is not one of the options ['Dissimilar', 'Similar']"
    )


def test_empty_test_file(data_dir):
    for seed in (100, 13, 21, 42, 87):
        task_file(data_dir, "poem_sentiment", K, seed, "test").write_text("")
    report = check_setting(data_dir, "real", k=K)
    assert len(report.problems) == 5
    assert report.problems[0] == (
        f"{task_file(data_dir, 'poem_sentiment', K, 100, 'test')}: the file has no examples "
        "(task 'poem_sentiment')"
    )


def test_missing_task_wrong_k_and_unknown_setting(data_dir):
    shutil.rmtree(data_dir / "climate_fever")
    report = check_setting(data_dir, "real", k=K)
    assert report.problems == [
        f"task 'climate_fever': no folder {data_dir / 'climate_fever'}; build it with "
        f"`maml-ds data build --tasks climate_fever --out {data_dir}`"
    ]
    wrong_k = check_setting(data_dir, "real", k=8).problems
    assert wrong_k[0] == (
        f"task 'poem_sentiment': no files for k=8 in {data_dir / 'poem_sentiment'} (found "
        "k=[4]); pass the k of its files (--k) or rebuild the task"
    )
    assert len(wrong_k) == 3
    assert "unknown setting 'nope'" in check_setting(data_dir, "nope").problems[0]


def test_meta_training_task_needs_k_plus_one_lines(data_dir):
    shutil.copy(
        task_file(data_dir, "poem_sentiment", K, 100, "train"),
        data_dir / "poem_sentiment" / "poem_sentiment_16384_100_train.jsonl",
    )
    write_setting(data_dir, "real", TASKS, train=["poem_sentiment", "glue-sst2"])
    problems = check_setting(data_dir, "real", k=K).problems
    assert len(problems) == 2
    assert "task 'poem_sentiment' has 4 examples, fewer than the 5 needed" in problems[0]
    assert problems[1].startswith("no data for task 'glue-sst2'")
    assert "`maml-ds data build --setting S --out DIR`" in problems[1]
    # a training run with 3 demonstrations per instance, checking its training data only
    report = check_setting(data_dir, "real", include_test=False, num_train_demonstrations=3)
    assert report.test == {} and len(report.problems) == 1
    assert report.train["poem_sentiment"].num_train == K


def test_overlaps_are_warnings(data_dir):
    # a task both meta-trained and tested on (MetaICL's `sick` in non_nli_to_nli)
    shutil.copy(
        task_file(data_dir, "poem_sentiment", K, 100, "test"),
        data_dir / "poem_sentiment" / "poem_sentiment_16384_100_train.jsonl",
    )
    write_setting(data_dir, "real", TASKS, train=["poem_sentiment"])
    # a demonstration that is also a test input
    test_line = task_file(data_dir, "climate_fever", K, 21, "test").read_text().splitlines()[0]
    demos = task_file(data_dir, "climate_fever", K, 21, "train")
    demos.write_text("\n".join([test_line, *demos.read_text().splitlines()[1:]]) + "\n")
    report = check_setting(data_dir, "real", k=K)
    assert report.ok
    assert report.train["poem_sentiment"].num_train == 12
    assert report.test["climate_fever"].num_overlap == 1
    assert any(
        "'poem_sentiment' is both a meta-training and a target task" in w for w in report.warnings
    )
    assert any("'climate_fever': 1 demonstration(s)" in w for w in report.warnings)
