"""The synthetic MetaICL-format suite: layout, determinism, validity, and that it measures ICL."""

from __future__ import annotations

import json
import os
import random
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
    _partition_rule,
    chance_score,
    nearest_demonstration_prediction,
    no_icl_problems,
    no_model_reference_accuracy,
    pair_relation,
    qa_answer,
    read_suite_summary,
    reference_by_family,
    suite_rule_split,
    suite_vocabulary,
    write_synthetic_suite,
)
from maml_ds.data.tasks import DataError, load_setting, load_task_config
from maml_ds.eval.metrics import macro_f1

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
    # Every data file, label list and the tokenizer's vocabulary change with the seed; the
    # settings, QA configs and the tokenizer's config do not.
    for rel in a.files:
        differs = (a.out_dir / rel).read_bytes() != (c.out_dir / rel).read_bytes()
        task = rel.split("/")[-1].split(".")[0]
        seeded = rel.endswith(".jsonl") or (task in a.tasks and a.tasks[task].options is not None)
        assert differs == (seeded or rel == "tokenizer/tokenizer.json"), rel
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
    expected |= {f"tokenizer/{name}" for name in ("tokenizer.json", "tokenizer_config.json")}
    assert set(suite.files) == expected and suite.tokenizer == "tokenizer"
    written = {p.relative_to(suite.out_dir).as_posix() for p in suite.out_dir.rglob("*.json*")}
    assert written == expected | {MANIFEST_NAME}
    assert len(suite.train_tasks) == 36 and len(suite.test_tasks) == 12
    assert len(suite.validation_tasks) == 24  # 2 per family and domain
    task = suite.test_tasks[0]
    tests = {(suite.out_dir / task / f"{task}_16_{s}_test.jsonl").read_bytes() for s in TEST_SEEDS}
    assert len(tests) == 1  # the test set is the same file for every seed
    assert len(_lines(suite.out_dir / task / f"{task}_16_13_dev.jsonl")) == 16


def test_every_file_passes_the_reader(suite: SuiteSummary) -> None:
    data_dir = suite.out_dir
    for name, lists in suite.settings.items():
        setting = load_setting(name, data_dir)
        assert (setting.train, setting.test, setting.unseen_domain_test, setting.validation) == (
            lists["train"],
            lists["test"],
            lists["unseen_domain_test"],
            lists["validation"],
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
            num_test = 64 if task.split == "test" else 48  # validation: 48
            assert (len(demos), len(dev), len(tests)) == (16, 16, num_test)
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
                    qa_answer(task.rule.split(":", 1)[1], line["input"], line["options"])
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


def test_validation_tasks_are_drawn_like_the_test_tasks(suite: SuiteSummary) -> None:
    tasks = suite.tasks
    validation = [tasks[n] for n in suite.validation_tasks]
    train_labels = {w for n in suite.train_tasks for w in tasks[n].options or ()}
    train_rules = {tasks[n].rule for n in suite.train_tasks}
    vocab = suite_vocabulary(0, suite.parameters)
    held_out_labels = set(vocab.heldout_labels)
    rule_split = suite_rule_split(0)
    held_out_rules = {family: rules for family, (_, rules) in rule_split.items()}
    for task in validation:
        assert task.name == f"synth_val_{task.family}_{task.domain}_{task.name[-1]}"
        assert task.rule not in train_rules
        if task.options is not None:  # held-out label words only
            assert set(task.options) <= held_out_labels and not set(task.options) & train_labels
        if task.family in ("attribute", "nli", "paraphrase"):
            assert task.rule in {tasks[n].rule for n in suite.test_tasks} | {
                (
                    f"attribute:{r}"
                    if task.family == "attribute"
                    else _partition_rule(task.family, r)
                )
                for r in held_out_rules[task.family]
            }
        if task.family == "qa":
            assert task.rule.startswith("qa:member:")
    for name, lists in suite.settings.items():
        families = {tasks[t].family for t in lists["test"]}
        assert {tasks[t].family for t in lists["validation"]} == families, name
        assert {tasks[t].domain for t in lists["validation"]} == {"seen", "unseen"}
        assert len(lists["validation"]) == 4 * len(families)
        for other in suite.settings.values():  # never a test or training task of any setting
            assert not set(lists["validation"]) & (set(other["test"]) | set(other["train"]))
    # Other instances than the test tasks: no validation line is a test line.
    lines = _all_lines(suite)
    test_lines = {json.dumps(x, sort_keys=True) for t in suite.test_tasks for x in lines[t]}
    assert not test_lines & {
        json.dumps(x, sort_keys=True) for t in suite.validation_tasks for x in lines[t]
    }


def test_a_setting_refuses_validation_tasks_that_it_tests(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"train": ["a"], "test": ["b"], "validation": ["b", "c"]}))
    with pytest.raises(DataError, match=r"'validation' task\(s\) also in 'test': \['b'\]"):
        load_setting(path)
    path.write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    assert load_setting(path).validation == ()


def test_qa_test_answers_cannot_be_read_from_the_input(suite: SuiteSummary) -> None:
    """The member rule: every option occurs once in the input, at a uniform position, so a rule
    of position or count (what the training tasks teach) scores chance without demonstrations."""
    lines = _all_lines(suite)
    member = [
        t for t in (*suite.test_tasks, *suite.validation_tasks) if suite.tasks[t].family == "qa"
    ]
    assert len(member) == 6
    for name in member:
        answer_set = set(suite.tasks[name].rule.split(":")[2].split(","))
        first = last = 0
        for line in lines[name]:
            words = line["input"].split()
            assert all(words.count(o) == 1 for o in line["options"])
            assert [o for o in line["options"] if o in answer_set] == [line["output"]]
            in_input = [w for w in words if w in line["options"]]
            first += in_input[0] == line["output"]
            last += in_input[-1] == line["output"]
        chance = sum(1 / len(x["options"]) for x in lines[name]) / len(lines[name])
        for score in (first / len(lines[name]), last / len(lines[name])):
            assert abs(score - chance) < 0.1, (name, score, chance)


def test_reference_solves_the_member_rule() -> None:
    def ex(text: str, output: str, options: tuple[str, ...]) -> Example:
        return Example("t", text, output, options)

    demos = [ex("a x y", "a", ("x", "a", "y")), ex("z b w", "b", ("b", "w", "z"))]
    # An option that answered a demonstration wins over the relational guess ("last word").
    assert nearest_demonstration_prediction(demos, ex("u v a", "?", ("v", "a", "u"))) == "a"
    # Not when an answer is another line's wrong option: no answer set explains them; then the
    # relation of the nearest demonstration ("a x y": the first word) decides.
    demos.append(ex("a b c", "c", ("a", "b", "c")))
    assert nearest_demonstration_prediction(demos, ex("u a v", "?", ("v", "a", "u"))) == "u"


def test_chance_score_is_the_expected_score_of_a_uniform_guess() -> None:
    mc = [Example("t", "x", "a", ("a", "b", "c")), Example("t", "x", "b", ("a", "b"))]
    assert chance_score(mc, classification=False) == pytest.approx((1 / 3 + 1 / 2) / 2)
    # One gold item of two labels: F1 is 1 when guessed (probability 1/2), else 0.
    assert chance_score([Example("t", "x", "a", ("a", "b"))], classification=True) == 0.5
    options = ("p", "q", "r")
    golds = ["p"] * 9 + ["q"] * 4 + ["r"] * 2
    examples = [Example("t", "x", g, options) for g in golds]
    rng = random.Random(0)
    simulated = [macro_f1([rng.choice(options) for _ in golds], golds) for _ in range(20000)]
    exact = chance_score(examples, classification=True)
    assert exact == pytest.approx(sum(simulated) / len(simulated), abs=0.005)
    assert exact < 1 / 3  # macro-F1 of a guess is below 1/#labels on an imbalanced test set


def test_no_icl_problems_names_tasks_answerable_from_their_input(suite: SuiteSummary) -> None:
    chances = {}
    for task in suite.test_tasks:
        test = load_examples(suite.out_dir, task, k=16, seed=100, split="test")
        classification = suite.tasks[task].options is not None
        chances[task] = chance_score(test, classification=classification)
    assert chances["qa_heldout_00"] == 0.25 and 0.3 < chances["nli_heldout_00"] < 0.34
    assert no_icl_problems({t: c + 0.14 for t, c in chances.items()}, suite.out_dir) == []
    problems = no_icl_problems({**chances, "qa_heldout_00": 0.62}, suite.out_dir)
    assert problems == [
        "qa_heldout_00: No ICL 62.0 > chance 25.0 + 15: answerable from its input alone, so it "
        "does not measure in-context learning (a defect of the task: its input must not reveal "
        "the answer)"
    ]
    assert len(no_icl_problems(chances, suite.out_dir, margin=-0.01)) == len(chances)
