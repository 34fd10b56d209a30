"""Settings, task configs and task files: what loads, and what each bad input says."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from maml_ds.data.reader import (
    Example,
    find_meta_train_file,
    load_examples,
    load_meta_train_examples,
    load_target_examples,
    task_file,
)
from maml_ds.data.tasks import (
    DataError,
    Setting,
    TaskConfig,
    available_settings,
    load_setting,
    load_task_config,
)

# --- built-in settings -----------------------------------------------------------------------

FOUR_UNSEEN = {"financial_phrasebank", "medical_questions_pairs", "poem_sentiment", "climate_fever"}

# the MetaICL settings (maml_ds/data/metaicl_config)
PROTOCOL_TABLE = {
    "hr_to_lr": (61, 26, FOUR_UNSEEN),
    "class_to_class": (43, 20, FOUR_UNSEEN),
    "non_class_to_class": (37, 20, FOUR_UNSEEN),
    "qa_to_qa": (37, 22, {"unifiedqa:mctest"}),
    "non_qa_to_qa": (33, 22, {"unifiedqa:mctest"}),
    "non_nli_to_nli": (55, 8, {"scitail"}),
    "non_paraphrase_to_paraphrase": (59, 4, {"medical_questions_pairs"}),
}
INST_SETTINGS = {
    "hr_to_lr_inst": (32, 12, {f"inst:{t}" for t in FOUR_UNSEEN}),
    "hr_to_lr_inst_all": (267, 12, {f"inst:{t}" for t in FOUR_UNSEEN}),
    "hr_to_lr_noinst": (32, 12, FOUR_UNSEEN),
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_TABLE | INST_SETTINGS))
def test_builtin_setting_counts(name):
    num_train, num_test, unseen = (PROTOCOL_TABLE | INST_SETTINGS)[name]
    setting = load_setting(name)
    assert setting.name == name
    assert (len(setting.train), len(setting.test)) == (num_train, num_test)
    assert set(setting.unseen_domain_test) == unseen
    assert set(setting.unseen_domain_test) <= set(setting.test)
    # every task has a built-in config; no target task is free-form
    for task in setting.all_tasks():
        config = load_task_config(task)
        if task in setting.test:
            assert config.task_type in ("classification", "multi-choice"), task


def test_overlap_quirk_is_kept_and_reported():
    assert load_setting("non_nli_to_nli").overlap() == ("sick",)
    assert "sick" in load_setting("non_nli_to_nli").train
    for name in sorted(set(PROTOCOL_TABLE) - {"non_nli_to_nli"}):
        assert load_setting(name).overlap() == (), name


def test_available_settings_builtin_and_data_dir(tmp_path):
    assert available_settings() == sorted(PROTOCOL_TABLE | INST_SETTINGS)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "synth_small.json").write_text(
        json.dumps({"train": ["a"], "test": ["b"]})
    )
    assert "synth_small" in available_settings(tmp_path)


def test_setting_from_data_dir_shadows_builtin_and_from_path(tmp_path):
    (tmp_path / "config").mkdir()
    local = {"train": ["t1", "t2"], "test": ["t3"], "unseen_domain_test": []}
    (tmp_path / "config" / "hr_to_lr.json").write_text(json.dumps(local))
    assert load_setting("hr_to_lr", tmp_path) == Setting("hr_to_lr", ("t1", "t2"), ("t3",), ())
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train": ["t1"], "test": ["t1", "t4"]}))
    setting = load_setting(str(path))
    assert setting == Setting("mine", ("t1",), ("t1", "t4"), ())
    assert setting.overlap() == ("t1",)


def test_unknown_setting_lists_available_names():
    with pytest.raises(DataError) as err:
        load_setting("hr_to_hr")
    msg = str(err.value)
    assert "unknown setting 'hr_to_hr'" in msg
    assert "hr_to_lr" in msg and "non_nli_to_nli" in msg


def test_missing_setting_file():
    with pytest.raises(DataError, match="setting file not found: /nowhere/x.json"):
        load_setting("/nowhere/x.json")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"train": ["a"]}, "missing key 'test'"),
        ({"train": "a", "test": ["b"]}, "'train' must be a list of non-empty task-name strings"),
        ({"train": ["a"], "test": ["b"], "tset": []}, "unknown key(s) ['tset']"),
        ({"train": ["a", "a"], "test": ["b"]}, "'train' lists task(s) more than once: ['a']"),
        ({"train": ["a"], "test": ["../b"]}, "invalid task name '../b'"),
        (["a"], "must be a JSON object"),
    ],
)
def test_invalid_setting(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError) as err:
        load_setting(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_setting_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"train": [\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_setting(path)


# --- task configs ----------------------------------------------------------------------------


def test_builtin_task_configs():
    assert load_task_config("sick") == TaskConfig(
        "classification", ("contradiction", "entailment", "neutral")
    )
    assert load_task_config("ai2_arc") == TaskConfig("multi-choice", None)
    assert load_task_config("unifiedqa:mctest").task_type == "multi-choice"


def test_task_config_from_data_dir_first(tmp_path):
    (tmp_path / "config" / "tasks").mkdir(parents=True)
    (tmp_path / "config" / "tasks" / "sick.json").write_text(
        json.dumps({"task_type": "classification", "options": ["yes", "no"]})
    )
    assert load_task_config("sick", tmp_path).options == ("yes", "no")
    assert load_task_config("ai2_arc", tmp_path).task_type == "multi-choice"  # falls back


def test_unknown_task():
    with pytest.raises(DataError) as err:
        load_task_config("no_such_task")
    assert "unknown task 'no_such_task'" in str(err.value)
    assert "config/tasks/no_such_task.json" in str(err.value)


def test_invalid_task_config(tmp_path):
    (tmp_path / "config" / "tasks").mkdir(parents=True)
    (tmp_path / "config" / "tasks" / "t.json").write_text(
        json.dumps({"task_type": "classification"})
    )
    with pytest.raises(DataError, match="classification task needs 'options'"):
        load_task_config("t", tmp_path)


# --- task files ------------------------------------------------------------------------------

LABELS = ["negative", "positive"]


def row(x: str = "good movie", y: str = "positive", options=None, task: str = "sent") -> dict:
    return {
        "task": task,
        "input": x,
        "output": y,
        "options": LABELS if options is None else options,
    }


def write(data_dir: Path, task: str, name: str, lines: list) -> Path:
    """Write a task file; dicts become JSON lines, strings are written as they are."""
    path = data_dir / task / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data folder with one classification target task `sent` and its task config."""
    (tmp_path / "config" / "tasks").mkdir(parents=True)
    (tmp_path / "config" / "tasks" / "sent.json").write_text(
        json.dumps({"task_type": "classification", "options": LABELS})
    )
    write(tmp_path, "sent", "sent_4_13_train.jsonl", [row(), row("bad", "negative")] * 2)
    write(
        tmp_path,
        "sent",
        "sent_4_13_test.jsonl",
        [row("fine", "positive"), row("awful", "negative")],
    )
    return tmp_path


def test_task_file_path(tmp_path):
    assert task_file(tmp_path, "glue-sst2", 16, 42, "test") == (
        tmp_path / "glue-sst2" / "glue-sst2_16_42_test.jsonl"
    )
    with pytest.raises(DataError, match="invalid task name"):
        task_file(tmp_path, "../etc", 16, 42, "test")


def test_load_examples(data_dir):
    demos = load_examples(data_dir, "sent", k=4, seed=13, split="train", min_examples=4)
    assert len(demos) == 4
    assert demos[1] == Example("sent", "bad", "negative", ("negative", "positive"))
    tests = load_examples(data_dir, "sent", k=4, seed=13, split="test")
    assert [e.output for e in tests] == ["positive", "negative"]


def test_blank_lines_are_skipped(data_dir):
    write(data_dir, "sent", "sent_4_13_dev.jsonl", [row(), "", "   ", row("bad", "negative")])
    assert len(load_examples(data_dir, "sent", k=4, seed=13, split="dev")) == 2


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError) as err:
        load_examples(tmp_path / "nope", "sent", k=4, seed=13, split="test")
    assert f"data directory not found: {tmp_path / 'nope'}" in str(err.value)
    assert "maml-ds data synth --out DIR" in str(err.value)


def test_missing_task_folder(data_dir):
    with pytest.raises(DataError) as err:
        load_examples(data_dir, "glue-sst2", k=16, seed=13, split="train")
    msg = str(err.value)
    assert "no data for task 'glue-sst2'" in msg and str(data_dir / "glue-sst2") in msg
    assert "maml-ds data synth --out DIR" in msg


def test_missing_file_lists_present_files(data_dir):
    with pytest.raises(DataError) as err:
        load_examples(data_dir, "sent", k=16, seed=13, split="train")
    msg = str(err.value)
    assert "missing file for task 'sent'" in msg
    assert str(data_dir / "sent" / "sent_16_13_train.jsonl") in msg
    assert "sent_4_13_test.jsonl" in msg and "sent_4_13_train.jsonl" in msg


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"task": "sent", "input": "x"', "not valid JSON"),
        ('["sent", "x", "positive"]', "expected a JSON object with fields"),
        (
            json.dumps({"task": "sent", "input": "x", "options": LABELS}),
            "missing field(s) ['output']",
        ),
        (json.dumps(row(x=3)), "field 'input' must be a string, got int"),
        (json.dumps(row(options="positive")), "field 'options' must be a list of strings"),
        (json.dumps(row(y="neutral")), "output 'neutral' is not one of the options"),
    ],
)
def test_malformed_line_names_file_and_line(data_dir, bad_line, expected):
    path = write(data_dir, "sent", "sent_4_13_train.jsonl", [row(), row(), bad_line, row()])
    with pytest.raises(DataError) as err:
        load_examples(data_dir, "sent", k=4, seed=13, split="train")
    assert f"{path}:3:" in str(err.value)
    assert expected in str(err.value)


def test_test_options_must_equal_task_options(data_dir):
    path = write(
        data_dir, "sent", "sent_4_13_test.jsonl", [row(), row(options=["positive", "neutral"])]
    )
    with pytest.raises(DataError) as err:
        load_examples(data_dir, "sent", k=4, seed=13, split="test")
    msg = str(err.value)
    assert f"{path}:2:" in msg
    assert "['positive', 'neutral']" in msg and "['negative', 'positive']" in msg


def test_test_options_order_matters(data_dir):
    write(data_dir, "sent", "sent_4_13_test.jsonl", [row(options=["positive", "negative"])])
    with pytest.raises(DataError, match="same labels, different order"):
        load_examples(data_dir, "sent", k=4, seed=13, split="test")


def test_train_options_are_not_compared_with_task_options(data_dir):
    write(data_dir, "sent", "sent_4_13_train.jsonl", [row(options=["positive", "meh"])] * 4)
    assert len(load_examples(data_dir, "sent", k=4, seed=13, split="train")) == 4


def test_explicit_task_config_wins(data_dir):
    config = TaskConfig("classification", ("positive", "negative"))
    with pytest.raises(DataError, match="differ from the options"):
        load_examples(data_dir, "sent", k=4, seed=13, split="test", task_config=config)


def test_multi_choice_test_lines(data_dir):
    mc = TaskConfig("multi-choice", None)
    write(
        data_dir,
        "mc",
        "mc_16_13_test.jsonl",
        [row(y="a", options=["a", "b"]), row(y="a", options=["a"])],
    )
    with pytest.raises(
        DataError, match=r"mc_16_13_test.jsonl:2: a test example needs at least 2 options"
    ):
        load_examples(data_dir, "mc", k=16, seed=13, split="test", task_config=mc)
    write(data_dir, "mc", "mc_16_13_test.jsonl", [row(y="c", options=["a", "b"])])
    with pytest.raises(
        DataError, match=r"mc_16_13_test.jsonl:1: output 'c' is not one of the options"
    ):
        load_examples(data_dir, "mc", k=16, seed=13, split="test", task_config=mc)


def test_free_form_task_cannot_be_tested(data_dir):
    write(data_dir, "ff", "ff_16_13_test.jsonl", [row(options=[])])
    with pytest.raises(DataError, match="free-form"):
        load_examples(
            data_dir, "ff", k=16, seed=13, split="test", task_config=TaskConfig("free-form", None)
        )


def test_test_split_of_unknown_task(data_dir):
    write(data_dir, "mystery", "mystery_16_13_test.jsonl", [row()])
    with pytest.raises(DataError, match="unknown task 'mystery'"):
        load_examples(data_dir, "mystery", k=16, seed=13, split="test")


def test_fewer_lines_than_k(data_dir):
    with pytest.raises(DataError) as err:
        load_examples(data_dir, "sent", k=4, seed=13, split="test", min_examples=16)
    assert "has 2 examples, fewer than the 16 needed" in str(err.value)


def test_empty_file(data_dir):
    write(data_dir, "sent", "sent_4_13_dev.jsonl", [])
    with pytest.raises(DataError, match="has no examples"):
        load_examples(data_dir, "sent", k=4, seed=13, split="dev")


def test_unknown_split(data_dir):
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_examples(data_dir, "sent", k=4, seed=13, split="valid")


def test_load_target_examples(data_dir):
    demos, tests = load_target_examples(data_dir, "sent", seed=13, k=4)
    assert (len(demos), len(tests)) == (4, 2)
    with pytest.raises(DataError, match="missing file"):
        load_target_examples(data_dir, "sent", seed=42, k=4)
    write(data_dir, "sent", "sent_4_13_train.jsonl", [row()] * 5)
    with pytest.raises(DataError, match="has 5 demonstrations, expected exactly k=4"):
        load_target_examples(data_dir, "sent", seed=13, k=4)


# --- meta-training files ---------------------------------------------------------------------


def test_meta_train_file_may_hold_fewer_lines(tmp_path):
    path = write(tmp_path, "ff", "ff_16384_100_train.jsonl", [row(options=[])] * 20)
    assert find_meta_train_file(tmp_path, "ff") == path
    examples = load_meta_train_examples(tmp_path, "ff", min_examples=17)
    assert len(examples) == 20 and examples[0].options == ()
    with pytest.raises(DataError, match="has 20 examples, fewer than the 21 needed"):
        load_meta_train_examples(tmp_path, "ff", min_examples=21)


def test_meta_train_file_with_another_k(tmp_path, caplog):
    write(tmp_path, "ff", "ff_16_100_train.jsonl", [row()] * 16)
    bigger = write(tmp_path, "ff", "ff_1024_100_train.jsonl", [row()] * 30)
    write(tmp_path, "ff", "ff_4096_13_train.jsonl", [row()] * 30)  # other seed: not used
    with caplog.at_level(logging.WARNING):
        assert find_meta_train_file(tmp_path, "ff") == bigger
    assert "ff_16384_100_train.jsonl not found; using ff_1024_100_train.jsonl" in caplog.text
    assert len(load_meta_train_examples(tmp_path, "ff")) == 30


def test_meta_train_file_missing(tmp_path):
    write(tmp_path, "ff", "ff_16_13_train.jsonl", [row()])
    with pytest.raises(DataError) as err:
        find_meta_train_file(tmp_path, "ff")
    assert "ff_16384_100_train.jsonl" in str(err.value) and "ff_16_13_train.jsonl" in str(err.value)
    with pytest.raises(DataError, match="no data for task 'gg'"):
        find_meta_train_file(tmp_path, "gg")
