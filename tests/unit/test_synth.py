"""The synthetic MetaICL-format suite: layout, determinism, validity, and that it measures ICL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from maml_ds.data.reader import (
    META_TRAIN_K,
    META_TRAIN_SEED,
    TEST_SEEDS,
    Example,
    load_examples,
    load_meta_train_examples,
    load_target_examples,
)
from maml_ds.data.synth import (
    CLASSIFICATION_FAMILIES,
    FAMILIES,
    MANIFEST_NAME,
    SEP,
    SETTINGS,
    SuiteSummary,
    nearest_demonstration_prediction,
    no_model_reference_accuracy,
    pair_relation,
    qa_answer,
    read_suite_summary,
    reference_by_family,
    write_synthetic_suite,
)
from maml_ds.data.tasks import load_setting, load_task_config

TINY = dict(
    num_train_tasks=6,
    train_examples_per_task=20,
    test_examples_per_task=8,
    test_pool_examples_per_task=64,
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> SuiteSummary:
    """The default suite: what `maml-ds data synth` writes."""
    return write_synthetic_suite(tmp_path_factory.mktemp("synth") / "data", seed=0)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_lines(summary: SuiteSummary) -> dict[str, list[dict]]:
    """task -> every line of every data file of that task."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for rel in summary.files:
        if rel.endswith(".jsonl"):
            by_task[rel.split("/")[0]] += _lines(summary.out_dir / rel)
    return by_task


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_synthetic_suite(tmp_path / "a", seed=3, **TINY)
    b = write_synthetic_suite(tmp_path / "b", seed=3, **TINY)
    c = write_synthetic_suite(tmp_path / "c", seed=4, **TINY)
    assert a.files == b.files == c.files
    for rel in (*a.files, MANIFEST_NAME):
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    # Every data file and label list changes with the seed; the settings and QA configs do not.
    for rel in a.files:
        differs = (a.out_dir / rel).read_bytes() != (c.out_dir / rel).read_bytes()
        task = rel.split("/")[-1].split(".")[0]
        seeded = rel.endswith(".jsonl") or (task in a.tasks and a.tasks[task].options is not None)
        assert differs == seeded, rel
    assert a.tasks["keyword_00"].options != c.tasks["keyword_00"].options
    # The manifest round-trips; writing over a previous (larger) suite replaces it entirely.
    assert read_suite_summary(a.out_dir) == a
    write_synthetic_suite(a.out_dir, seed=5, **{**TINY, "num_train_tasks": 7})
    assert (a.out_dir / "keyword_01").is_dir()
    write_synthetic_suite(a.out_dir, seed=3, **TINY)
    assert sorted(p.name for p in a.out_dir.iterdir()) == sorted(
        p.name for p in b.out_dir.iterdir()
    )
    for rel in (*a.files, MANIFEST_NAME):
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel


def test_same_bytes_in_another_process_with_another_hash_seed(tmp_path: Path) -> None:
    here = write_synthetic_suite(tmp_path / "here", seed=7, **TINY)
    code = (
        "import sys; from pathlib import Path; from maml_ds.data import synth; "
        f"synth.write_synthetic_suite(Path(sys.argv[1]), seed=7, **{TINY!r})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env)
    for rel in (*here.files, MANIFEST_NAME):
        assert (here.out_dir / rel).read_bytes() == (tmp_path / "there" / rel).read_bytes(), rel


def test_refuses_a_foreign_folder_and_lists_every_bad_size(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_synthetic_suite(tmp_path, **TINY)
    with pytest.raises(ValueError) as error:
        write_synthetic_suite(tmp_path / "new", num_train_tasks=2, k=2, train_examples_per_task=2)
    assert "num_train_tasks >= 6" in str(error.value) and "k >= 4" in str(error.value)
    assert not (tmp_path / "new").exists()


def test_metaicl_layout(suite: SuiteSummary) -> None:
    expected = {f"config/{s}.json" for s in SETTINGS}
    for task in suite.tasks.values():
        expected.add(f"config/tasks/{task.name}.json")
        if task.split == "train":
            expected.add(f"{task.name}/{task.name}_{META_TRAIN_K}_{META_TRAIN_SEED}_train.jsonl")
        else:
            for seed in TEST_SEEDS:
                for split in ("train", "dev", "test"):
                    expected.add(f"{task.name}/{task.name}_16_{seed}_{split}.jsonl")
    assert set(suite.files) == expected
    written = {p.relative_to(suite.out_dir).as_posix() for p in suite.out_dir.rglob("*.json*")}
    assert written == expected | {MANIFEST_NAME}
    assert len(suite.train_tasks) == 36 and len(suite.test_tasks) == 12
    task = suite.test_tasks[0]
    tests = {(suite.out_dir / task / f"{task}_16_{s}_test.jsonl").read_bytes() for s in TEST_SEEDS}
    assert len(tests) == 1  # the test set is the same file for every seed
    assert len(_lines(suite.out_dir / task / f"{task}_16_13_dev.jsonl")) == 16


def test_every_file_passes_the_reader(suite: SuiteSummary) -> None:
    data_dir = suite.out_dir
    for name, lists in suite.settings.items():
        setting = load_setting(name, data_dir)
        assert (setting.train, setting.test, setting.unseen_domain_test) == (
            lists["train"],
            lists["test"],
            lists["unseen_domain_test"],
        )
        assert setting.overlap() == ()
    for task in suite.tasks.values():
        config = load_task_config(task.name, data_dir)
        assert config.task_type == task.task_type
        assert config.options == task.options
        if task.split == "train":
            examples = load_meta_train_examples(data_dir, task.name, min_examples=17)
            assert len(examples) == suite.parameters["train_examples_per_task"]
            continue
        for seed in TEST_SEEDS:
            demos, tests = load_target_examples(data_dir, task.name, seed=seed, k=16)
            dev = load_examples(data_dir, task.name, k=16, seed=seed, split="dev")
            assert (len(demos), len(dev), len(tests)) == (16, 16, 64)
            if task.options is not None:  # every class is demonstrated
                assert {d.output for d in demos} == set(task.options)


def test_every_line_follows_its_task_rule(suite: SuiteSummary) -> None:
    for name, lines in _all_lines(suite).items():
        task = suite.tasks[name]
        label_of: dict = {}  # what decides the label -> the label; must be a function
        for line in lines:
            assert line["task"] == name and line["output"] in line["options"]
            words = line["input"].split()
            if task.options is not None:
                assert line["options"] == list(task.options)
            if task.family in ("nli", "paraphrase"):
                assert len(words) == 7 and words[3] == SEP
                relation = pair_relation(line["input"])
                assert label_of.setdefault(relation, line["output"]) == line["output"], name
            elif task.family == "qa":
                assert 2 <= len(words) <= 6
                assert (
                    qa_answer(task.rule.split(":")[1], line["input"], line["options"])
                    == (line["output"])
                )
            else:
                assert 1 <= len(words) <= 4
                assert len(words) == 1 or task.family != "keyword"
                for word in words:
                    assert label_of.setdefault(word, line["output"]) == line["output"], name
        if task.family in ("nli", "paraphrase"):  # the relations fall into the rule's blocks
            blocks = defaultdict(set)
            for relation, label in label_of.items():
                blocks[label].add(relation)
            rule_blocks = {frozenset(b.split("+")) for b in task.rule.split(":")[1].split("|")}
            assert {frozenset(b) for b in blocks.values()} == rule_blocks
        if task.family == "keyword":
            assert len(label_of) == 2 * len(task.options)  # two trigger words per class


def test_families_settings_and_unseen_domain(suite: SuiteSummary) -> None:
    for split in ("train", "test"):
        families = {t.family for t in suite.tasks.values() if t.split == split}
        assert families == set(FAMILIES)
    assert set(suite.settings) == set(SETTINGS) and "synthetic" in SETTINGS
    for name, lists in suite.settings.items():
        train_families, test_families = SETTINGS[name]
        assert lists["train"] and lists["test"] and lists["unseen_domain_test"]
        assert not set(lists["train"]) & set(lists["test"])
        assert set(lists["unseen_domain_test"]) <= set(lists["test"])
        assert {suite.tasks[t].family for t in lists["train"]} == set(train_families)
        assert {suite.tasks[t].family for t in lists["test"]} == set(test_families)
    assert "nli" not in {
        suite.tasks[t].family for t in suite.settings["synth_non_nli_to_nli"]["train"]
    }
    # The unseen domain's words occur in no meta-training task.
    lines = _all_lines(suite)
    train_words = {w for t in suite.train_tasks for line in lines[t] for w in line["input"].split()}
    for task in suite.unseen_domain_tasks:
        words = {w for line in lines[task] for w in line["input"].split()}
        assert words & train_words <= {SEP}, task


def test_test_tasks_use_held_out_rules_and_label_words(suite: SuiteSummary) -> None:
    train = [suite.tasks[t] for t in suite.train_tasks]
    test = [suite.tasks[t] for t in suite.test_tasks]
    assert not {t.rule for t in test} & {t.rule for t in train}
    # Structural rules (attribute index, relation partition, QA rule) are held out as a whole.
    for family in ("attribute", "nli", "paraphrase", "qa"):
        train_rules = {t.rule for t in train if t.family == family}
        assert (
            len(train_rules) > 1 and not {t.rule for t in test if t.family == family} & train_rules
        )
    # Label words: drawn per task, and a test task's label words never label a training task.
    train_labels = {w for t in train if t.options for w in t.options}
    test_labels = {w for t in test if t.options for w in t.options}
    assert test_labels and not test_labels & train_labels
    option_lists = [t.options for t in (*train, *test) if t.options]
    assert len(set(option_lists)) == len(option_lists)


def test_nearest_demonstration_prediction() -> None:
    def ex(text: str, output: str, options: tuple[str, ...] = ("yes", "no")) -> Example:
        return Example("t", text, output, options)

    demos = [ex("a b", "no"), ex("c d", "yes"), ex("a c", "yes")]
    assert nearest_demonstration_prediction(demos, ex("d x", "?")) == "yes"
    assert nearest_demonstration_prediction(demos, ex("b c", "?")) == "no"  # tie: first demo
    assert nearest_demonstration_prediction(demos, ex("zz", "?")) == "no"  # no overlap: first
    # Multi-choice: the option in the demonstration answer's relation (here: the last word).
    qa = [ex("p q r", "r", ("p", "r", "s")), ex("m n", "n", ("n", "m", "o"))]
    assert nearest_demonstration_prediction(qa, ex("u v w", "?", ("u", "w", "v"))) == "w"


def test_no_model_reference_shows_demonstrations_carry_the_label(suite: SuiteSummary) -> None:
    results = no_model_reference_accuracy(suite.out_dir)
    assert set(results) == set(suite.test_tasks)
    table = reference_by_family(suite, results)
    for domain in ("seen", "unseen"):
        for family in ("keyword", "topic", "qa"):
            reference = table[(family, domain)]
            assert reference.accuracy >= reference.chance + 0.4, (family, domain, reference)
        for family in CLASSIFICATION_FAMILIES:
            assert 0.25 <= table[(family, domain)].chance <= 0.5
