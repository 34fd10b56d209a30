"""Fresh meta-training tasks: reproducible from (seed, position), never shared, training
conventions only (no held-out label word, rule or unseen-domain word), the setting's families."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from maml_ds.data.fresh import COPY, FreshPromptSampler, FreshTasks, FreshTaskSampler
from maml_ds.data.reader import load_meta_train_examples
from maml_ds.data.sampler import PromptSpec
from maml_ds.data.synth import FAMILIES, SEP, read_suite_summary
from maml_ds.data.tasks import DataError

NUM_PROMPTS = 200
K = 4


def _fresh(synth_dir: Path, *, setting: str = "synthetic", seed: int = 0, copy_share: float = 0.25):
    return FreshTasks.from_suite(synth_dir, setting=setting, seed=seed, k=K, copy_share=copy_share)


def _words(prompt: PromptSpec) -> set[str]:
    words: set[str] = set()
    for example in (*prompt.demonstrations, prompt.target):
        words.update(
            example.input.split(), example.output.split(), *(o.split() for o in example.options)
        )
    return words - {SEP}


def test_rebuilt_vocabulary_and_rules_are_the_suites(synth_dir: Path) -> None:
    """The vocabulary and rule split rebuilt from the manifest are the suite's own."""
    summary = read_suite_summary(synth_dir)
    fresh = _fresh(synth_dir)
    vocabulary = fresh.vocabulary
    for example in load_meta_train_examples(synth_dir, summary.train_tasks[0]):
        assert set(example.input.split()) - {SEP} <= set(vocabulary.seen_words)
    for task in summary.tasks.values():
        if task.options is not None:
            pool = vocabulary.train_labels if task.split == "train" else vocabulary.heldout_labels
            assert set(task.options) <= set(pool), task.name
    for task in summary.tasks.values():
        if task.family in ("attribute", "qa"):
            value = task.rule.split(":")[1]
            rules = fresh.rule_split[task.family][0 if task.split == "train" else 1]
            assert value in [str(r) for r in rules], task.name


def test_same_seed_and_position_give_the_same_prompt(synth_dir: Path) -> None:
    first, second = _fresh(synth_dir), _fresh(synth_dir)
    assert [first.prompt_at(i) for i in range(50)] == [second.prompt_at(i) for i in range(50)]
    assert first.task_prompts(7, 6) == second.task_prompts(7, 6)
    other_seed = _fresh(synth_dir, seed=1)
    assert [first.prompt_at(i) for i in range(50)] != [other_seed.prompt_at(i) for i in range(50)]

    # Resuming from a saved state continues the stream exactly.
    sampler = FreshPromptSampler(first)
    head = sampler.take(10)
    state = sampler.state_dict()
    tail = sampler.take(10)
    resumed = FreshPromptSampler(second)
    resumed.load_state_dict(state)
    assert state == {"position": 10}
    assert head + tail == [first.prompt_at(i) for i in range(20)]
    assert resumed.take(10) == tail

    maml = FreshTaskSampler(first)
    maml.take(num_batches=2, batch_size=3)
    maml_state = maml.state_dict()
    expected = maml.take(num_batches=2, batch_size=3)
    maml_resumed = FreshTaskSampler(second)
    maml_resumed.load_state_dict(maml_state)
    assert maml_state == {"num_drawn": 1}
    assert maml_resumed.take(num_batches=2, batch_size=3) == expected


def test_no_two_prompts_share_a_task(synth_dir: Path) -> None:
    """Every MetaICL prompt draws its own task. Keyword and topic tasks get new word sets every
    time; the rule spaces of attribute, nli and paraphrase are small (a few training rules x
    ordered label tuples of this small suite's 12 training labels), so a rare repeat there is
    chance; qa has no labels and only its training rules: its tasks differ by their examples."""
    fresh = _fresh(synth_dir)
    tasks = [fresh.task_at(i) for i in range(NUM_PROMPTS)]
    drawn = [(t.family, t.rule, t.labels) for t in tasks if t.family not in (COPY, "qa")]
    assert len(drawn) > NUM_PROMPTS // 2
    repeated = [task for task, count in Counter(drawn).items() if count > 1]
    assert {family for family, _, _ in repeated} <= {"attribute", "nli", "paraphrase"}
    assert len(set(drawn)) >= 0.97 * len(drawn)
    # Each prompt's examples come from its own task: classification outputs are its labels.
    for i, task in enumerate(tasks):
        prompt = fresh.prompt_at(i)
        assert prompt.task == task.name
        if task.labels is not None:
            examples = (*prompt.demonstrations, prompt.target)
            assert all(e.options == task.labels and e.output in task.labels for e in examples)


def test_maml_task_prompts_share_one_task(synth_dir: Path) -> None:
    fresh = _fresh(synth_dir, copy_share=0.0)
    index = next(i for i in range(100) if fresh.task_at(i).family == "keyword")
    task = fresh.task_at(index)
    prompts = fresh.task_prompts(index, 8)
    assert len(prompts) == 8 and all(p.task == task.name for p in prompts)
    assert all(len(p.demonstrations) == K for p in prompts)
    assert {e.output for p in prompts for e in (*p.demonstrations, p.target)} <= set(task.labels)
    # The support and query batches of one MAML draw are prompts of one task.
    sampler = FreshTaskSampler(fresh)
    sampler.load_state_dict({"num_drawn": index})
    batches = sampler.take(num_batches=4, batch_size=2)
    assert [p for b in batches for p in b] == prompts


def test_training_conventions_only(synth_dir: Path) -> None:
    """No held-out label word or unseen-domain word outside copy prompts; copy prompts use the
    whole inventory, held-out label words included."""
    fresh = _fresh(synth_dir)
    vocabulary = fresh.vocabulary
    held_out = set(vocabulary.heldout_labels) | set(vocabulary.unseen_words)
    allowed = set(vocabulary.seen_words) | set(vocabulary.train_labels)
    copied: set[str] = set()
    for i in range(NUM_PROMPTS):
        prompt = fresh.prompt_at(i)
        words = _words(prompt)
        if prompt.task == f"fresh_{COPY}":
            assert prompt.demonstrations == ()
            copied_words = prompt.target.output.split()
            assert prompt.target.input.split()[-len(copied_words) :] == copied_words
            assert prompt.target.options == ()
            copied |= words
            continue
        assert len(prompt.demonstrations) == K
        assert words <= allowed and not words & held_out, i
        labels = fresh.task_at(i).labels
        if labels is not None:  # label words never occur in the task's inputs
            inputs = {w for e in (*prompt.demonstrations, prompt.target) for w in e.input.split()}
            assert not inputs & set(labels)
    assert copied & set(vocabulary.heldout_labels) and copied & set(vocabulary.unseen_words)

    # Only the training rules: no fresh task carries a rule held out for the test tasks.
    test_rules = {t.rule for t in read_suite_summary(synth_dir).tasks.values() if t.split == "test"}
    assert not {fresh.task_at(i).rule for i in range(NUM_PROMPTS)} & test_rules


@pytest.mark.parametrize(
    ("setting", "families"),
    [
        ("synthetic", set(FAMILIES)),
        ("synth_non_nli_to_nli", set(FAMILIES) - {"nli"}),
        ("synth_non_class_to_class", {"qa"}),
    ],
)
def test_families_follow_the_setting(synth_dir: Path, setting: str, families: set[str]) -> None:
    fresh = _fresh(synth_dir, setting=setting, copy_share=0.0)
    assert {fresh.task_at(i).family for i in range(NUM_PROMPTS)} == families


@pytest.mark.parametrize("copy_share", [0.0, 1 / 3, 0.9])
def test_copy_share(synth_dir: Path, copy_share: float) -> None:
    fresh = _fresh(synth_dir, copy_share=copy_share)
    counts = Counter(fresh.task_at(i).family == COPY for i in range(2000))
    assert counts[True] / 2000 == pytest.approx(copy_share, abs=0.03)


def test_refusals(synth_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()  # a MetaICL-style folder without the suite's manifest
    with pytest.raises(DataError, match="fresh tasks need a synthetic suite: maml-ds data synth"):
        _fresh(tmp_path)
    with pytest.raises(DataError, match="not in the synthetic suite"):
        _fresh(synth_dir, setting="class_to_class")
    with pytest.raises(ValueError, match="copy_share"):
        _fresh(synth_dir, copy_share=1.0)
