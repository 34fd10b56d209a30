"""A synthetic task suite in the MetaICL on-disk format, so the whole pipeline runs offline.

Every task is built from made-up words (pronounceable random syllables) and made-up label words
drawn per task, so a label cannot be known without the demonstrations: the suite measures
in-context learning. Six families mirror the real MetaICL settings:

- ``keyword``    (classification): each class owns 2 trigger words; the input is ONE trigger word.
                 The family a tiny model learns first (docs/synthetic-suite.md).
- ``topic``      (classification): each class owns a set of 6 words; the input is 2-4 of them.
- ``attribute``  (classification): every word carries 4 hidden ternary attributes; the task labels
                 inputs (2-3 words sharing a value) by one attribute.
- ``nli``        (classification, 3 classes) and ``paraphrase`` (2 classes): the input is
                 ``"a b c [SEP] x y z"``; the label is the block of a partition of the five
                 relations of the second half to the first (same / reversed / shuffled /
                 disjoint / one word changed) that the pair falls in.
- ``qa``         (multi-choice, 3-4 options per line): training tasks answer with the option that
                 is the first word / the last word / the only one present / the only one absent /
                 the one repeated in the input; test tasks with the one option in the task's
                 hidden answer set (the "member" rule: the input alone cannot tell it).

Held-out (test) tasks use held-out label words and held-out rules (attributes, relation
partitions and the QA rule never used by a training task; fresh word sets for keyword and topic).
Each family also has test tasks over a second, held-out vocabulary built from other syllables:
the "unseen domain". Validation tasks are drawn like the test tasks (other instances), for
choosing lr and steps without looking at the test tasks.

Layout written (docs/data.md)::

    DIR/{task}/{task}_16384_100_train.jsonl          meta-training tasks
    DIR/{task}/{task}_{k}_{seed}_{train,dev,test}.jsonl   test and validation tasks, 5 seeds
    DIR/config/{setting}.json              {"train", "test", "unseen_domain_test", "validation"}
    DIR/config/tasks/{task}.json                     {"task_type", "options"}
    DIR/tokenizer/                                   a word-level tokenizer of every word
    DIR/synthetic_suite.json                         manifest: parameters, tasks, files

The same seed gives byte-identical files: every random draw comes from a ``random.Random`` seeded
with a string (hashed with SHA-512 by Python, so independent of PYTHONHASHSEED), JSON keys are
sorted and every list is written in a fixed order.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from maml_ds.data.reader import (
    META_TRAIN_K,
    META_TRAIN_SEED,
    TEST_SEEDS,
    Example,
    load_examples,
    load_target_examples,
)
from maml_ds.data.tasks import load_task_config

MANIFEST_NAME = "synthetic_suite.json"
TOKENIZER_DIR = "tokenizer"
"""The suite's word-level tokenizer (`word_tokenizer.py`), relative to the suite folder."""
SMALL_SUITE: dict[str, int] = {
    "num_train_tasks": 6,
    "train_examples_per_task": 48,
    "test_examples_per_task": 16,
    "test_pool_examples_per_task": 64,
    "num_content_words": 64,
    "num_unseen_domain_words": 48,
    "num_label_words": 24,
    "num_heldout_label_words": 12,
    "validation_examples_per_task": 16,
}
"""Sizes of a suite small enough for seconds-long runs and k = 4 demonstrations per prompt
(the test fixtures and the memory report's measurement use it)."""
SEP = "[SEP]"

FAMILIES = ("keyword", "topic", "attribute", "nli", "paraphrase", "qa")
CLASSIFICATION_FAMILIES = ("keyword", "topic", "attribute", "nli", "paraphrase")
RELATIONS = ("same", "reversed", "shuffled", "disjoint", "one_changed")
QA_RULES = ("first", "last", "present", "absent", "repeated")
"""The positional QA rules: training tasks only (a model can learn to read them from the input)."""
QA_MEMBER_RULE = "member"
"""The QA rule of test and validation tasks: the answer is the one option in a hidden answer set
drawn per task; every option also occurs in the input, in random order, so without the
demonstrations no model does better than chance in expectation."""
QA_ANSWER_SET_SIZE = 6

# setting -> (families of its training tasks, families of its test tasks); mirrors the real
# MetaICL settings (docs/data.md). Train and test tasks are disjoint in every setting
# (MetaICL's `sick` quirk in non_nli_to_nli has no synthetic counterpart).
_NON = {f: tuple(g for g in FAMILIES if g != f) for f in FAMILIES}
SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "synthetic": (FAMILIES, FAMILIES),
    "synth_class_to_class": (CLASSIFICATION_FAMILIES, CLASSIFICATION_FAMILIES),
    "synth_non_class_to_class": (("qa",), CLASSIFICATION_FAMILIES),
    "synth_qa_to_qa": (("qa",), ("qa",)),
    "synth_non_qa_to_qa": (CLASSIFICATION_FAMILIES, ("qa",)),
    "synth_non_nli_to_nli": (_NON["nli"], ("nli",)),
    "synth_non_paraphrase_to_paraphrase": (_NON["paraphrase"], ("paraphrase",)),
}

# Family shapes. Inputs stay at 1-6 words (7 for pairs): a BPE tokenizer makes made-up words 2-3x
# longer (docs/synthetic-suite.md), and 16 demonstrations must fit the 1024-token context.
KEYWORD_TRIGGERS_PER_CLASS = 2
TOPIC_WORDS_PER_CLASS = 6
TOPIC_INPUT_WORDS = (2, 4)
ATTRIBUTE_INPUT_WORDS = (2, 3)
NUM_ATTRIBUTES = 4
NUM_ATTRIBUTE_VALUES = 3
PAIR_HALF_WORDS = 3  # >= 3 so that a shuffle differs from both the identity and the reversal
QA_NUM_OPTIONS = (3, 4)
MAX_QA_INPUT_WORDS = 6
NUM_CLASSES = {
    "keyword": (2, 4),
    "topic": (2, 4),
    "attribute": (2, 3),
    "nli": (3, 3),
    "paraphrase": (2, 2),
}
MAX_CLASSES = 4

# Syllable inventories. The two domains share no consonant letter, so their words never collide
# and look different to a tokenizer.
_SEEN_ONSETS = tuple("bdfgklmnprstvz")
_SEEN_NUCLEI = tuple("aiou")  # no "e": it would make many English words (more, time, gone)
_UNSEEN_ONSETS = ("ch", "sh", "th", "wh", "j", "h", "w", "y", "x", "c")
_UNSEEN_NUCLEI = ("a", "o", "u", "ai", "ee")


@dataclass(frozen=True)
class SynthTask:
    """One task of the suite and the rule that labels it."""

    name: str
    family: str
    """One of FAMILIES."""
    split: str
    """"train" (a meta-training task), "test" (a held-out target task) or "validation" (drawn
    like the test tasks, for choosing lr and steps)."""
    domain: str
    """"seen" (the main vocabulary) or "unseen" (the held-out vocabulary)."""
    rule: str
    """What decides the label, e.g. "qa:last", "qa:member:<answer set>", "attribute:3",
    "nli:same+shuffled|disjoint|..."; for keyword/topic the class word sets. No test or
    validation task shares its rule with a training task."""
    options: tuple[str, ...] | None
    """The fixed label words of a classification task (in option order); None for multi-choice."""

    @property
    def task_type(self) -> str:
        return "multi-choice" if self.options is None else "classification"


@dataclass(frozen=True)
class SuiteSummary:
    """What `write_synthetic_suite` wrote (also stored as ``DIR/synthetic_suite.json``)."""

    out_dir: Path
    seed: int
    parameters: dict[str, int]
    """Every size the suite was generated with (the keyword arguments)."""
    settings: dict[str, dict[str, tuple[str, ...]]]
    """setting -> {"train", "test", "unseen_domain_test", "validation"} -> tasks."""
    tasks: dict[str, SynthTask]
    files: tuple[str, ...]
    """Paths relative to out_dir, POSIX style, sorted; the manifest itself is not listed."""
    tokenizer: str | None = None
    """The folder of the suite's word-level tokenizer, relative to out_dir (TOKENIZER_DIR);
    None for a suite written before the suite had one."""

    @property
    def train_tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks.values() if t.split == "train")

    @property
    def test_tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks.values() if t.split == "test")

    @property
    def validation_tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks.values() if t.split == "validation")

    @property
    def unseen_domain_tasks(self) -> tuple[str, ...]:
        """The test tasks of the unseen domain."""
        return tuple(
            t.name for t in self.tasks.values() if t.split == "test" and t.domain == "unseen"
        )

    def __str__(self) -> str:
        return (
            f"{len(self.train_tasks)} meta-training tasks, {len(self.test_tasks)} test tasks "
            f"({len(self.unseen_domain_tasks)} of an unseen domain), "
            f"{len(self.validation_tasks)} validation tasks, settings "
            f"{', '.join(self.settings)}; {len(self.files)} files, seed {self.seed}"
        )

    def to_json(self) -> str:
        record = {
            "generator": "maml_ds.data.synth.write_synthetic_suite",
            "seed": self.seed,
            "parameters": self.parameters,
            "settings": {s: {k: list(v) for k, v in d.items()} for s, d in self.settings.items()},
            "tasks": [
                {**asdict(t), "options": None if t.options is None else list(t.options)}
                for t in self.tasks.values()
            ],
            "files": list(self.files),
            "tokenizer": self.tokenizer,
        }
        return json.dumps(record, sort_keys=True, indent=1) + "\n"


def read_suite_summary(out_dir: Path) -> SuiteSummary:
    """The summary of a suite on disk, from its manifest."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {out_dir} was not written by write_synthetic_suite"
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    tasks = {}
    for t in record["tasks"]:
        options = None if t["options"] is None else tuple(t["options"])
        tasks[t["name"]] = SynthTask(**{**t, "options": options})
    return SuiteSummary(
        out_dir=out_dir,
        seed=record["seed"],
        parameters=record["parameters"],
        settings={s: {k: tuple(v) for k, v in d.items()} for s, d in record["settings"].items()},
        tasks=tasks,
        files=tuple(record["files"]),
        tokenizer=record.get("tokenizer"),
    )


# --------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class Vocabulary:
    seen_words: tuple[str, ...]
    unseen_words: tuple[str, ...]
    train_labels: tuple[str, ...]
    heldout_labels: tuple[str, ...]
    # word -> its value of each hidden attribute, in range(NUM_ATTRIBUTE_VALUES)
    attributes: dict[str, tuple[int, ...]]


def _syllable_words(onsets: Sequence[str], nuclei: Sequence[str], num_syllables: int) -> list[str]:
    syllables = [o + n for o in onsets for n in nuclei]
    return ["".join(p) for p in itertools.product(syllables, repeat=num_syllables)]


def _make_vocabulary(
    rng: random.Random,
    num_content_words: int,
    num_unseen_domain_words: int,
    num_label_words: int,
    num_heldout_label_words: int,
) -> Vocabulary:
    # Two-syllable words (4-6 letters): short, since BPE splits made-up words into several tokens.
    seen_pool = _syllable_words(_SEEN_ONSETS, _SEEN_NUCLEI, 2)
    drawn = rng.sample(seen_pool, num_content_words + num_label_words)
    seen_words, labels = drawn[:num_content_words], drawn[num_content_words:]
    unseen_words = rng.sample(
        _syllable_words(_UNSEEN_ONSETS, _UNSEEN_NUCLEI, 2), num_unseen_domain_words
    )
    attributes = {
        w: tuple(rng.randrange(NUM_ATTRIBUTE_VALUES) for _ in range(NUM_ATTRIBUTES))
        for w in (*seen_words, *unseen_words)
    }
    num_train_labels = num_label_words - num_heldout_label_words
    return Vocabulary(
        seen_words=tuple(seen_words),
        unseen_words=tuple(unseen_words),
        train_labels=tuple(labels[:num_train_labels]),
        heldout_labels=tuple(labels[num_train_labels:]),
        attributes=attributes,
    )


# --------------------------------------------------------------------------------------------
# Families: each builder returns (rule, draw) with draw(rng) -> (input, output, options).

Draw = Callable[[random.Random], tuple[str, str, list[str]]]


def _set_partitions(items: Sequence[str], num_blocks: int) -> list[tuple[tuple[str, ...], ...]]:
    """All partitions of `items` into exactly `num_blocks` non-empty blocks, in a fixed order."""

    def extend(i: int, blocks: list[list[str]]):
        if i == len(items):
            if len(blocks) == num_blocks:
                yield tuple(tuple(b) for b in blocks)
            return
        for block in blocks:
            block.append(items[i])
            yield from extend(i + 1, blocks)
            block.pop()
        if len(blocks) < num_blocks:
            blocks.append([items[i]])
            yield from extend(i + 1, blocks)
            blocks.pop()

    return list(extend(0, []))


def _partition_rule(family: str, partition: Sequence[Sequence[str]]) -> str:
    return f"{family}:" + "|".join(sorted("+".join(sorted(b)) for b in partition))


def _word_sets_rule(family: str, word_sets: Sequence[Sequence[str]]) -> str:
    return f"{family}:" + "|".join(sorted(",".join(sorted(ws)) for ws in word_sets))


def _sample_excluding(
    rng: random.Random, words: Sequence[str], k: int, exclude: Sequence[str]
) -> list[str]:
    return rng.sample([w for w in words if w not in exclude], k)


def _keyword_task(
    rng: random.Random, words: Sequence[str], labels: Sequence[str]
) -> tuple[str, Draw]:
    drawn = rng.sample(words, len(labels) * KEYWORD_TRIGGERS_PER_CLASS)
    triggers = [drawn[c :: len(labels)] for c in range(len(labels))]

    def draw(r: random.Random) -> tuple[str, str, list[str]]:
        c = r.randrange(len(labels))
        return r.choice(triggers[c]), labels[c], list(labels)

    return _word_sets_rule("keyword", triggers), draw


def _topic_task(
    rng: random.Random, words: Sequence[str], labels: Sequence[str]
) -> tuple[str, Draw]:
    drawn = rng.sample(words, len(labels) * TOPIC_WORDS_PER_CLASS)
    topics = [drawn[c :: len(labels)] for c in range(len(labels))]

    def draw(r: random.Random) -> tuple[str, str, list[str]]:
        c = r.randrange(len(labels))
        return " ".join(r.sample(topics[c], r.randint(*TOPIC_INPUT_WORDS))), labels[c], list(labels)

    return _word_sets_rule("topic", topics), draw


def _attribute_task(
    rng: random.Random,
    words: Sequence[str],
    labels: Sequence[str],
    attribute: int,
    attributes: dict[str, tuple[int, ...]],
) -> tuple[str, Draw]:
    values = sorted(rng.sample(range(NUM_ATTRIBUTE_VALUES), len(labels)))
    members = [[w for w in words if attributes[w][attribute] == v] for v in values]
    if min(len(m) for m in members) < ATTRIBUTE_INPUT_WORDS[1]:
        raise ValueError(
            f"too few words with each value of attribute {attribute}: raise num_content_words "
            "or num_unseen_domain_words"
        )

    def draw(r: random.Random) -> tuple[str, str, list[str]]:
        c = r.randrange(len(labels))
        return (
            " ".join(r.sample(members[c], r.randint(*ATTRIBUTE_INPUT_WORDS))),
            labels[c],
            list(labels),
        )

    return f"attribute:{attribute}", draw


_SHUFFLES = [
    p
    for p in itertools.permutations(range(PAIR_HALF_WORDS))
    if p != tuple(range(PAIR_HALF_WORDS)) and p != tuple(reversed(range(PAIR_HALF_WORDS)))
]


def _second_half(
    r: random.Random, first: list[str], relation: str, words: Sequence[str]
) -> list[str]:
    if relation == "same":
        return list(first)
    if relation == "reversed":
        return first[::-1]
    if relation == "shuffled":
        return [first[i] for i in r.choice(_SHUFFLES)]
    if relation == "disjoint":
        return _sample_excluding(r, words, len(first), first)
    if relation == "one_changed":
        second = list(first)
        second[r.randrange(len(first))] = _sample_excluding(r, words, 1, first)[0]
        return second
    raise AssertionError(relation)


def pair_relation(text: str) -> str:
    """The relation of the second half of a pair input to its first half (one of RELATIONS)."""
    first_text, second_text = text.split(f" {SEP} ")
    first, second = first_text.split(), second_text.split()
    shared = sum(a == b for a, b in zip(first, second, strict=True))
    if second == first:
        return "same"
    if second == first[::-1]:
        return "reversed"
    if sorted(second) == sorted(first):
        return "shuffled"
    if not set(second) & set(first):
        return "disjoint"
    if shared == len(first) - 1:
        return "one_changed"
    raise ValueError(f"no relation holds between the halves of {text!r}")


def _pair_task(
    words: Sequence[str],
    labels: Sequence[str],
    family: str,
    partition: Sequence[Sequence[str]],
) -> tuple[str, Draw]:
    def draw(r: random.Random) -> tuple[str, str, list[str]]:
        c = r.randrange(len(labels))
        first = r.sample(words, PAIR_HALF_WORDS)
        second = _second_half(r, first, r.choice(partition[c]), words)
        return f"{' '.join(first)} {SEP} {' '.join(second)}", labels[c], list(labels)

    return _partition_rule(family, partition), draw


def _qa_input(
    r: random.Random, rule: str, answer: str, options: list[str], words: Sequence[str]
) -> list[str]:
    others = [o for o in options if o != answer]

    def fillers(k: int) -> list[str]:
        return _sample_excluding(r, words, k, options)

    if rule == "present":  # the only option in the input
        body = [answer, *fillers(r.randint(2, 4))]
        r.shuffle(body)
        return body
    if rule == "absent":  # the only option missing from the input
        body = others + fillers(r.randint(0, 2))
        r.shuffle(body)
        return body
    if rule == "repeated":  # the only option that occurs twice
        body = [answer, answer, *others]
        body += fillers(r.randint(0, min(2, MAX_QA_INPUT_WORDS - len(body))))
        r.shuffle(body)
        return body
    if rule in ("first", "last"):  # the option at that end; other options occur inside
        middle = r.sample(others, r.randint(1, len(others)))
        middle += fillers(r.randint(0, min(2, MAX_QA_INPUT_WORDS - 1 - len(middle))))
        r.shuffle(middle)
        return [answer, *middle] if rule == "first" else [*middle, answer]
    raise AssertionError(rule)


def qa_answer(rule: str, input_text: str, options: Sequence[str]) -> str:
    """The option that `rule` selects for an input; raises if not exactly one.

    `rule` is a qa task's rule without its "qa:" prefix: one of QA_RULES, or
    "member:<answer set, comma-separated>" (QA_MEMBER_RULE)."""
    words = input_text.split()
    if rule.startswith(f"{QA_MEMBER_RULE}:"):
        answer_set = set(rule.split(":", 1)[1].split(","))
        selected = [o for o in options if o in answer_set]
    else:
        selected = {
            "first": [o for o in options if words[0] == o],
            "last": [o for o in options if words[-1] == o],
            "present": [o for o in options if o in words],
            "absent": [o for o in options if o not in words],
            "repeated": [o for o in options if words.count(o) == 2],
        }[rule]
    if len(selected) != 1:
        raise ValueError(
            f"rule {rule!r} selects {selected} among {list(options)} for {input_text!r}"
        )
    return selected[0]


def _qa_task(
    words: Sequence[str], rule: str, num_options: int, rng: random.Random | None = None
) -> tuple[str, Draw]:
    """A qa task of one of QA_RULES, or of QA_MEMBER_RULE, whose answer set is drawn from `rng`."""
    if rule == QA_MEMBER_RULE:
        if rng is None:
            raise ValueError(f"the {QA_MEMBER_RULE!r} rule draws an answer set: pass rng")
        return _qa_member_task(rng, words, num_options)

    def draw(r: random.Random) -> tuple[str, str, list[str]]:
        options = r.sample(words, num_options)
        answer = r.choice(options)
        return " ".join(_qa_input(r, rule, answer, options, words)), answer, options

    return f"qa:{rule}", draw


def _qa_member_task(rng: random.Random, words: Sequence[str], num_options: int) -> tuple[str, Draw]:
    """Each line's options hold exactly one word of the task's hidden answer set: the answer.
    The input is every option plus 0-2 (3 options: 0-3) other words, shuffled, so the position
    of the answer is uniform and it occurs in the input like every other option."""
    answer_set = rng.sample(words, QA_ANSWER_SET_SIZE)
    outside = [w for w in words if w not in answer_set]

    def draw(r: random.Random) -> tuple[str, str, list[str]]:
        answer = r.choice(answer_set)
        options = [answer, *r.sample(outside, num_options - 1)]
        r.shuffle(options)
        body = options + _sample_excluding(
            r, outside, r.randint(0, MAX_QA_INPUT_WORDS - num_options), options
        )
        r.shuffle(body)
        return " ".join(body), answer, options

    return f"qa:{QA_MEMBER_RULE}:" + ",".join(sorted(answer_set)), draw


# --------------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class _TaskPlan:
    task: SynthTask
    draw: Draw


def _held_out_rules(rng: random.Random) -> dict[str, tuple[list, list]]:
    """family -> (training rules, held-out rules) for the families with a discrete rule space.

    About a third of each rule space is held out for test tasks; the choice depends on the seed.
    QA holds out a rule of its own instead (QA_MEMBER_RULE).
    """
    spaces: dict[str, list] = {
        "attribute": list(range(NUM_ATTRIBUTES)),
        "nli": _set_partitions(RELATIONS, 3),
        "paraphrase": _set_partitions(RELATIONS, 2),
        "qa": list(QA_RULES),
    }
    split = {}
    for family, space in spaces.items():
        rng.shuffle(space)
        num_held_out = (len(space) + 1) // 3
        split[family] = (space[num_held_out:], space[:num_held_out])
    # Every positional QA rule is readable from the input alone: they all train, and the test
    # rule is the member rule (QA_MEMBER_RULE), which no training task uses.
    split["qa"] = (spaces["qa"], [QA_MEMBER_RULE])
    return split


def suite_vocabulary(seed: int, sizes: Mapping[str, int]) -> Vocabulary:
    """The vocabulary of the suite of `seed` with these sizes (the manifest's parameters)."""
    return _make_vocabulary(
        random.Random(f"maml-ds-synth:{seed}:vocabulary"),
        sizes["num_content_words"],
        sizes["num_unseen_domain_words"],
        sizes["num_label_words"],
        sizes["num_heldout_label_words"],
    )


def suite_rule_split(seed: int) -> dict[str, tuple[list, list]]:
    """family -> (training rules, held-out rules) of the suite of `seed` (`_held_out_rules`)."""
    return _held_out_rules(random.Random(f"maml-ds-synth:{seed}:rules"))


def draw_training_task(
    rng: random.Random,
    family: str,
    vocabulary: Vocabulary,
    rule_split: Mapping[str, tuple[list, list]],
) -> tuple[str, tuple[str, ...] | None, Draw]:
    """A new task of `family` drawn like a training task: seen-domain words, a training rule,
    labels from the training label pool (kept out of the content words, so a label never occurs
    in an input). Returns (rule, label words in option order or None for qa, draw)."""
    words = vocabulary.seen_words
    if family == "qa":
        rule, draw = _qa_task(words, rng.choice(rule_split["qa"][0]), rng.choice(QA_NUM_OPTIONS))
        return rule, None, draw
    labels = rng.sample(vocabulary.train_labels, rng.randint(*NUM_CLASSES[family]))
    if family == "keyword":
        rule, draw = _keyword_task(rng, words, labels)
    elif family == "topic":
        rule, draw = _topic_task(rng, words, labels)
    elif family == "attribute":
        attribute = rng.choice(rule_split["attribute"][0])
        rule, draw = _attribute_task(rng, words, labels, attribute, vocabulary.attributes)
    else:  # nli, paraphrase
        rule, draw = _pair_task(words, labels, family, rng.choice(rule_split[family][0]))
    return rule, tuple(labels), draw


def _plan_tasks(
    seed: int,
    vocab: Vocabulary,
    num_train_tasks: int,
    num_test_tasks_per_family: int,
    num_unseen_domain_tasks_per_family: int,
    num_validation_tasks_per_family: int,
) -> list[_TaskPlan]:
    rule_split = suite_rule_split(seed)
    # (name, family, split, domain, index into the family's rules of that split)
    entries: list[tuple[str, str, str, str, int]] = []
    for i in range(num_train_tasks):
        family = FAMILIES[i % len(FAMILIES)]
        index = i // len(FAMILIES)
        entries.append((f"{family}_{index:02d}", family, "train", "seen", index))
    for family in FAMILIES:
        held_out = [
            (f"{family}_heldout_{j:02d}", "test", "seen") for j in range(num_test_tasks_per_family)
        ]
        held_out += [
            (f"{family}_unseen_{j:02d}", "test", "unseen")
            for j in range(num_unseen_domain_tasks_per_family)
        ]
        # Validation tasks continue the test tasks' walk through the held-out rules.
        held_out += [
            (f"synth_val_{family}_{domain}_{j}", "validation", domain)
            for domain in ("seen", "unseen")
            for j in range(num_validation_tasks_per_family)
        ]
        entries += [(n, family, split, d, j) for j, (n, split, d) in enumerate(held_out)]

    plans: list[_TaskPlan] = []
    used_rules: set[str] = set()
    for name, family, split, domain, index in entries:
        rng = random.Random(f"maml-ds-synth:{seed}:{name}:task")
        words = vocab.unseen_words if domain == "unseen" else vocab.seen_words
        label_pool = vocab.train_labels if split == "train" else vocab.heldout_labels
        labels = (
            rng.sample(label_pool, rng.randint(*NUM_CLASSES[family])) if family != "qa" else None
        )
        rule_choice = None  # the discrete rule of attribute / nli / paraphrase / qa tasks
        if family in rule_split:
            rules = rule_split[family][0 if split == "train" else 1]
            rule_choice = rules[index % len(rules)]
        for _ in range(100):  # keyword/topic: redraw word sets until the rule is new
            if family == "keyword":
                rule, draw = _keyword_task(rng, words, labels)
            elif family == "topic":
                rule, draw = _topic_task(rng, words, labels)
            elif family == "attribute":
                rule, draw = _attribute_task(rng, words, labels, rule_choice, vocab.attributes)
            elif family in ("nli", "paraphrase"):
                rule, draw = _pair_task(words, labels, family, rule_choice)
            else:
                rule, draw = _qa_task(words, rule_choice, rng.choice(QA_NUM_OPTIONS), rng)
            if family not in ("keyword", "topic") or rule not in used_rules:
                break
        else:
            raise ValueError(f"could not draw a new rule for {name}: raise num_content_words")
        used_rules.add(rule)
        task = SynthTask(
            name, family, split, domain, rule, None if labels is None else tuple(labels)
        )
        plans.append(_TaskPlan(task, draw))
    return plans


def _line(task: str, example: tuple[str, str, list[str]]) -> str:
    text, output, options = example
    return (
        json.dumps(
            {"task": task, "input": text, "output": output, "options": options}, sort_keys=True
        )
        + "\n"
    )


def _draw_lines(plan: _TaskPlan, stream: str, seed: int, n: int) -> list[str]:
    rng = random.Random(f"maml-ds-synth:{seed}:{plan.task.name}:{stream}")
    return [_line(plan.task.name, plan.draw(rng)) for _ in range(n)]


def _demonstration_indices(
    pool: list[str],
    labels: tuple[str, ...] | None,
    k: int,
    rng: random.Random,
) -> list[int]:
    """2k distinct pool indices (train, then dev); the first k cover every label of a
    classification task, so that every class is demonstrated (MetaICL samples plainly)."""
    for _ in range(1000):
        picked = rng.sample(range(len(pool)), 2 * k)
        if labels is None or {json.loads(pool[i])["output"] for i in picked[:k]} == set(labels):
            return picked
    raise ValueError(
        "could not draw demonstrations covering every label: raise test_pool_examples_per_task"
    )


def _validate_sizes(n: dict[str, int]) -> None:
    """Collect every invalid size into one error."""
    seen_capacity = (len(_SEEN_ONSETS) * len(_SEEN_NUCLEI)) ** 2
    unseen_capacity = (len(_UNSEEN_ONSETS) * len(_UNSEEN_NUCLEI)) ** 2
    min_words = 2 * MAX_CLASSES * TOPIC_WORDS_PER_CLASS
    checks = [
        (
            n["num_train_tasks"] >= len(FAMILIES),
            f"num_train_tasks >= {len(FAMILIES)} (one per family)",
        ),
        (n["k"] >= MAX_CLASSES, f"k >= {MAX_CLASSES} (every class is demonstrated)"),
        (
            n["k"] + 1 <= n["train_examples_per_task"] <= META_TRAIN_K,
            f"k+1 <= train_examples_per_task <= {META_TRAIN_K} (k OTHER examples per example)",
        ),
        (
            n["test_pool_examples_per_task"] >= 4 * n["k"],
            "test_pool_examples_per_task >= 4k (k train + k dev lines per seed)",
        ),
        (n["test_examples_per_task"] >= 1, "test_examples_per_task >= 1"),
        (n["num_test_tasks_per_family"] >= 1, "num_test_tasks_per_family >= 1"),
        (n["num_unseen_domain_tasks_per_family"] >= 0, "num_unseen_domain_tasks_per_family >= 0"),
        (n["num_validation_tasks_per_family"] >= 0, "num_validation_tasks_per_family >= 0"),
        (n["validation_examples_per_task"] >= 1, "validation_examples_per_task >= 1"),
        (
            MAX_CLASSES <= n["num_heldout_label_words"] <= n["num_label_words"] - MAX_CLASSES,
            f"{MAX_CLASSES} <= num_heldout_label_words <= num_label_words - {MAX_CLASSES}",
        ),
        (
            min_words <= n["num_content_words"] <= seen_capacity - n["num_label_words"],
            f"{min_words} <= num_content_words <= {seen_capacity} - num_label_words",
        ),
        (
            min_words <= n["num_unseen_domain_words"] <= unseen_capacity,
            f"{min_words} <= num_unseen_domain_words <= {unseen_capacity}",
        ),
    ]
    problems = [rule for ok, rule in checks if not ok]
    if problems:
        given = ", ".join(f"{key}={value}" for key, value in n.items())
        raise ValueError(
            "invalid synthetic suite sizes; need:\n  - "
            + "\n  - ".join(problems)
            + f"\n(given {given})"
        )


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse a non-empty folder unless it holds a previous suite, whose files are removed."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is not a folder")
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        if any(out_dir.iterdir()):
            raise ValueError(
                f"--out {out_dir} is not empty and holds no {MANIFEST_NAME}: "
                "choose a new or empty folder"
            )
        return
    for rel in read_suite_summary(out_dir).files:
        (out_dir / rel).unlink(missing_ok=True)
    manifest.unlink()
    for folder in sorted(
        (p for p in out_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
    ):
        if not any(folder.iterdir()):
            folder.rmdir()


def _suite_words(vocab: Vocabulary, files: dict[str, str]) -> list[str]:
    """SEP and the whole vocabulary (in its order), then every other word of the data files."""
    words = dict.fromkeys(
        (SEP, *vocab.seen_words, *vocab.unseen_words, *vocab.train_labels, *vocab.heldout_labels)
    )
    found: set[str] = set()
    for rel, content in files.items():
        if rel.endswith(".jsonl"):
            for line in content.splitlines():
                record = json.loads(line)
                for text in (record["input"], record["output"], *record["options"]):
                    found.update(text.split())
    return [*words, *sorted(found - words.keys())]


def _tokenizer_files(words: Sequence[str]) -> dict[str, str]:
    """TOKENIZER_DIR/... -> content: the saved `word_level_tokenizer(words)`."""
    from maml_ds.data.word_tokenizer import word_level_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        word_level_tokenizer(words).save_pretrained(tmp)
        return {
            f"{TOKENIZER_DIR}/{p.name}": p.read_text(encoding="utf-8")
            for p in sorted(Path(tmp).iterdir())
        }


def write_synthetic_suite(
    out_dir: Path,
    *,
    seed: int = 0,
    num_train_tasks: int = 36,
    train_examples_per_task: int = 256,
    num_test_tasks_per_family: int = 1,
    num_unseen_domain_tasks_per_family: int = 1,
    test_examples_per_task: int = 64,
    test_pool_examples_per_task: int = 128,
    k: int = 16,
    num_content_words: int = 192,
    num_unseen_domain_words: int = 64,
    num_label_words: int = 64,
    num_heldout_label_words: int = 24,
    num_validation_tasks_per_family: int = 2,
    validation_examples_per_task: int = 48,
) -> SuiteSummary:
    """Write the synthetic suite to `out_dir` in the MetaICL format and return what was written.

    Args:
        out_dir: a new or empty folder, or one holding a previous suite (its files are replaced).
        seed: the suite's seed; the same seed and sizes give byte-identical files.
        num_train_tasks: meta-training tasks, spread round-robin over the six families.
        train_examples_per_task: lines of each ``{task}_16384_100_train.jsonl``.
        num_test_tasks_per_family: held-out test tasks per family over the main vocabulary.
        num_unseen_domain_tasks_per_family: test tasks per family over the held-out vocabulary
            (listed in ``unseen_domain_test``).
        test_examples_per_task: lines of each ``{task}_{k}_{seed}_test.jsonl`` (same for all seeds).
        test_pool_examples_per_task: the pool each seed's k train and k dev lines are drawn from.
        k: demonstrations per test seed (MetaICL: 16).
        num_content_words: made-up words of the main vocabulary.
        num_unseen_domain_words: made-up words of the unseen domain (other syllables).
        num_label_words: made-up label words; the last `num_heldout_label_words` of them label
            test and validation tasks only.
        num_validation_tasks_per_family: validation tasks per family and domain (seen, unseen),
            drawn like the test tasks; each setting lists those of its test families.
        validation_examples_per_task: lines of a validation task's ``_test.jsonl``.
    """
    sizes = {
        "num_train_tasks": num_train_tasks,
        "train_examples_per_task": train_examples_per_task,
        "num_test_tasks_per_family": num_test_tasks_per_family,
        "num_unseen_domain_tasks_per_family": num_unseen_domain_tasks_per_family,
        "test_examples_per_task": test_examples_per_task,
        "test_pool_examples_per_task": test_pool_examples_per_task,
        "k": k,
        "num_content_words": num_content_words,
        "num_unseen_domain_words": num_unseen_domain_words,
        "num_label_words": num_label_words,
        "num_heldout_label_words": num_heldout_label_words,
        "num_validation_tasks_per_family": num_validation_tasks_per_family,
        "validation_examples_per_task": validation_examples_per_task,
    }
    _validate_sizes(sizes)
    out_dir = Path(out_dir)
    vocab = suite_vocabulary(seed, sizes)
    plans = _plan_tasks(
        seed,
        vocab,
        num_train_tasks,
        num_test_tasks_per_family,
        num_unseen_domain_tasks_per_family,
        num_validation_tasks_per_family,
    )

    files: dict[str, str] = {}  # relative path -> content
    for plan in plans:
        t = plan.task
        if t.split == "train":
            lines = _draw_lines(plan, "train", seed, train_examples_per_task)
            files[f"{t.name}/{t.name}_{META_TRAIN_K}_{META_TRAIN_SEED}_train.jsonl"] = "".join(
                lines
            )
        else:
            pool = _draw_lines(plan, "pool", seed, test_pool_examples_per_task)
            num_test = test_examples_per_task if t.split == "test" else validation_examples_per_task
            test = "".join(_draw_lines(plan, "test", seed, num_test))
            for demo_seed in TEST_SEEDS:
                rng = random.Random(f"maml-ds-synth:{seed}:{t.name}:k{k}:seed{demo_seed}")
                picked = _demonstration_indices(pool, t.options, k, rng)
                prefix = f"{t.name}/{t.name}_{k}_{demo_seed}"
                files[f"{prefix}_train.jsonl"] = "".join(pool[i] for i in picked[:k])
                files[f"{prefix}_dev.jsonl"] = "".join(pool[i] for i in picked[k:])
                files[f"{prefix}_test.jsonl"] = test
        config = {
            "task_type": t.task_type,
            "options": None if t.options is None else list(t.options),
        }
        files[f"config/tasks/{t.name}.json"] = json.dumps(config, sort_keys=True) + "\n"

    tasks = {p.task.name: p.task for p in plans}

    def names(split: str, families: Sequence[str]) -> tuple[str, ...]:
        return tuple(
            sorted(t.name for t in tasks.values() if t.split == split and t.family in families)
        )

    settings: dict[str, dict[str, tuple[str, ...]]] = {}
    for setting, (train_families, test_families) in SETTINGS.items():
        test = names("test", test_families)
        settings[setting] = {
            "train": names("train", train_families),
            "test": test,
            "unseen_domain_test": tuple(n for n in test if tasks[n].domain == "unseen"),
            "validation": names("validation", test_families),
        }
        record = {key: list(value) for key, value in settings[setting].items()}
        files[f"config/{setting}.json"] = json.dumps(record, sort_keys=True) + "\n"
    files.update(_tokenizer_files(_suite_words(vocab, files)))

    _prepare_out_dir(out_dir)
    for rel in sorted(files):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as f:
            f.write(files[rel])
    summary = SuiteSummary(
        out_dir, seed, sizes, settings, tasks, tuple(sorted(files)), TOKENIZER_DIR
    )
    (out_dir / MANIFEST_NAME).write_text(summary.to_json(), encoding="utf-8", newline="\n")
    return summary


# --------------------------------------------------------------------------------------------
# The no-model reference (docs/synthetic-suite.md): proof that the demonstrations carry the label.


def _qa_signature(option: str, words: Sequence[str]) -> tuple[bool, bool, int]:
    return (words[0] == option, words[-1] == option, min(words.count(option), 2))


def nearest_demonstration_prediction(demonstrations: Sequence[Example], example: Example) -> str:
    """Predict `example`'s output from the demonstration that shares the most words with its input
    (ties: the first such demonstration).

    Classification (every demonstration has the example's options): that demonstration's label.
    Multi-choice (options differ per line): if no demonstration's answer is another one's wrong
    option (one answer set explains them all, as in the member rule) and an option answered a
    demonstration, the first such option. Otherwise the option that stands in the same relation
    to the input (first word, last word, occurrence count) as that demonstration's answer to its
    input; failing that, the first option with the same occurrence count; failing that, the
    first option.
    """
    words = example.input.split()
    query = set(words)
    # max() returns the first of equal maxima: ties go to the earliest demonstration.
    nearest = max(demonstrations, key=lambda d: len(query & set(d.input.split())))
    if all(d.options == example.options for d in demonstrations):
        return nearest.output
    answers = {d.output for d in demonstrations}
    wrong = {o for d in demonstrations for o in d.options if o != d.output}
    answered = [o for o in example.options if o in answers]
    if answered and not answers & wrong:
        return answered[0]
    target = _qa_signature(nearest.output, nearest.input.split())
    signatures = [_qa_signature(o, words) for o in example.options]
    for same in (lambda s: s == target, lambda s: s[2] == target[2]):
        for option, signature in zip(example.options, signatures, strict=True):
            if same(signature):
                return option
    return example.options[0]


@dataclass(frozen=True)
class ReferenceAccuracy:
    accuracy: float
    """Mean over the demonstration seeds."""
    per_seed: tuple[float, ...]
    chance: float
    """Expected accuracy of a uniform guess among each line's options."""


def no_model_reference_accuracy(
    data_dir: Path,
    tasks: Sequence[str] | None = None,
    *,
    k: int = 16,
    seeds: Sequence[int] = TEST_SEEDS,
) -> dict[str, ReferenceAccuracy]:
    """Accuracy of `nearest_demonstration_prediction` on the test set of each task, with the k
    demonstrations of each seed's ``{task}_{k}_{seed}_train.jsonl`` (read with the project's
    reader). `tasks` defaults to the test tasks of the suite's manifest."""
    data_dir = Path(data_dir)
    if tasks is None:
        tasks = read_suite_summary(data_dir).test_tasks
    results = {}
    for task in tasks:
        per_seed, chance = [], 0.0
        for s in seeds:
            demonstrations, test = load_target_examples(data_dir, task, seed=s, k=k)
            correct = sum(
                nearest_demonstration_prediction(demonstrations, e) == e.output for e in test
            )
            per_seed.append(correct / len(test))
            chance = sum(1 / len(e.options) for e in test) / len(test)
        results[task] = ReferenceAccuracy(sum(per_seed) / len(per_seed), tuple(per_seed), chance)
    return results


def reference_by_family(
    summary: SuiteSummary,
    results: dict[str, ReferenceAccuracy],
) -> dict[tuple[str, str], ReferenceAccuracy]:
    """(family, domain) -> the mean of `results` over that family's tasks of that domain."""
    groups: dict[tuple[str, str], list[ReferenceAccuracy]] = {}
    for name, result in results.items():
        task = summary.tasks[name]
        groups.setdefault((task.family, task.domain), []).append(result)
    table = {}
    for family in FAMILIES:
        for domain in ("seen", "unseen"):
            group = groups.get((family, domain))
            if group:
                per_seed = tuple(
                    sum(r.per_seed[i] for r in group) / len(group)
                    for i in range(len(group[0].per_seed))
                )
                table[(family, domain)] = ReferenceAccuracy(
                    sum(r.accuracy for r in group) / len(group),
                    per_seed,
                    sum(r.chance for r in group) / len(group),
                )
    return table


# --------------------------------------------------------------------------------------------
# The No-ICL check (docs/synthetic-suite.md): a test task must need its demonstrations.


def chance_score(examples: Sequence[Example], *, classification: bool) -> float:
    """The expected score of choosing uniformly among each example's options.

    Accuracy: the mean of 1/#options. Macro-F1 (`maml_ds.eval.metrics.macro_f1`: the mean over
    the gold labels of 2 TP / (gold + predicted)) exactly: per gold label, TP and the false
    positives are independent binomials of its gold count and of the other examples, with
    probability 1/#options."""
    if not examples:
        raise ValueError("no examples to score")
    if not classification:
        return sum(1 / len(e.options) for e in examples) / len(examples)
    p = 1 / len(examples[0].options)
    gold = Counter(e.output for e in examples)

    def binomial(n: int) -> list[float]:
        return [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]

    total = 0.0
    for count in gold.values():
        hits, false_hits = binomial(count), binomial(len(examples) - count)
        total += sum(
            ph * pf * 2 * tp / (count + tp + fp)
            for tp, ph in enumerate(hits)
            if tp
            for fp, pf in enumerate(false_hits)
        )
    return total / len(gold)


def no_icl_problems(
    scores: Mapping[str, float],
    data_dir: Path,
    *,
    margin: float = 0.15,
    k: int = 16,
    seed: int = TEST_SEEDS[0],
) -> list[str]:
    """One line per task of `scores` (task -> No-ICL score in [0, 1], the mean over seeds)
    whose score exceeds its `chance_score` + `margin`: such a task is answerable from its input
    alone and does not measure in-context learning. The test set is read from `data_dir`
    (``{task}_{k}_{seed}_test.jsonl``, the same for every seed)."""
    problems = []
    for task, score in scores.items():
        config = load_task_config(task, data_dir)
        test = load_examples(data_dir, task, k=k, seed=seed, split="test", task_config=config)
        chance = chance_score(test, classification=config.is_classification)
        if score > chance + margin:
            problems.append(
                f"{task}: No ICL {100 * score:.1f} > chance {100 * chance:.1f} + "
                f"{100 * margin:.0f}: answerable from its input alone, so it does not measure "
                "in-context learning (a defect of the task: its input must not reveal the answer)"
            )
    return problems
