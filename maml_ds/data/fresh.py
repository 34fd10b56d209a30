"""Meta-training tasks that cannot be memorised: a fresh synthetic task for every prompt.

Prompt ``i`` (MetaICL) or MAML task ``i`` is a new task drawn from (seed, i) alone: new label
words, a new rule instance (trigger and topic word sets, attribute values, relation partition,
QA rule), the suite's training conventions only. So resume is exact, every rank draws the same
stream, and the held-out label words, rules and unseen domain stay for the test tasks; copy
prompts alone use the whole inventory, so that held-out label words stay copyable.
Why, and what was measured: docs/icl-research.md.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from maml_ds.data import synth
from maml_ds.data.reader import Example
from maml_ds.data.sampler import PromptSpec
from maml_ds.data.synth import Draw, Vocabulary
from maml_ds.data.tasks import DataError

__all__ = ["COPY", "FreshPromptSampler", "FreshTask", "FreshTaskSampler", "FreshTasks"]

COPY = "copy"
"""The family of free-form copy prompts: random prefix + s, then s (no demonstrations)."""
COPY_PREFIX_WORDS = (0, 12)
COPY_STRING_WORDS = (8, 24)
"""Word counts of a copy prompt's prefix and copied string (the research prototype's)."""


@dataclass(frozen=True)
class FreshTask:
    """One drawn task: what identifies it, and how to draw its examples."""

    family: str
    """A family of synth.FAMILIES, or COPY."""
    rule: str
    """The rule instance as synth names it (e.g. "keyword:<word sets>", "qa:first"); "copy"."""
    labels: tuple[str, ...] | None
    """The label words of a classification task in option order; None for qa and copy."""
    draw: Draw | None
    """draw(rng) -> (input, output, options); None for copy (see FreshTasks.copy_prompt)."""

    @property
    def name(self) -> str:
        """The task name its prompts carry."""
        return f"fresh_{self.family}"


class FreshTasks:
    """The stream of fresh tasks of one run: a pure function of (seed, index)."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        rule_split: Mapping[str, tuple[list, list]],
        *,
        families: tuple[str, ...],
        seed: int,
        k: int,
        copy_share: float,
    ):
        unknown = [f for f in families if f not in synth.FAMILIES]
        if not families or unknown:
            raise ValueError(f"families must be a non-empty subset of {synth.FAMILIES}: {families}")
        if not 0.0 <= copy_share < 1.0:
            raise ValueError(f"copy_share must be in [0, 1), got {copy_share}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.vocabulary = vocabulary
        self.rule_split = rule_split
        self.families = families
        self.seed = seed
        self.k = k
        self.copy_share = copy_share
        # Copy prompts copy every word of the inventory, held-out labels and unseen domain too.
        self.copy_words = (
            *vocabulary.seen_words,
            *vocabulary.unseen_words,
            *vocabulary.train_labels,
            *vocabulary.heldout_labels,
        )

    @classmethod
    def from_suite(
        cls, data_dir: Path | str, *, setting: str, seed: int, k: int, copy_share: float
    ) -> FreshTasks:
        """The fresh tasks of `setting`'s training families, over the vocabulary and the
        training rules of the synthetic suite in `data_dir` (rebuilt from its manifest)."""
        try:
            summary = synth.read_suite_summary(Path(data_dir))
        except FileNotFoundError:
            raise DataError(
                f"{data_dir} holds no {synth.MANIFEST_NAME}: fresh tasks need a synthetic suite: "
                "maml-ds data synth --out DIR"
            ) from None
        if setting not in summary.settings:
            raise DataError(
                f"setting {setting!r} is not in the synthetic suite {data_dir} "
                f"(it has {', '.join(summary.settings)})"
            )
        train_families = {summary.tasks[t].family for t in summary.settings[setting]["train"]}
        # The suite's own vocabulary and rule split, from its manifest (tests/unit/test_fresh.py
        # checks them against the tasks written).
        vocabulary = synth.suite_vocabulary(summary.seed, summary.parameters)
        rule_split = synth.suite_rule_split(summary.seed)
        return cls(
            vocabulary,
            rule_split,
            families=tuple(f for f in synth.FAMILIES if f in train_families),
            seed=seed,
            k=k,
            copy_share=copy_share,
        )

    def _rng(self, index: int, stream: str) -> random.Random:
        return random.Random(f"maml-ds-fresh:{self.seed}:{index}:{stream}")

    def task_at(self, index: int) -> FreshTask:
        """Task `index`: copy with probability copy_share, else a family drawn uniformly."""
        rng = self._rng(index, "task")
        if rng.random() < self.copy_share:
            return FreshTask(COPY, COPY, None, None)
        family = rng.choice(self.families)
        rule, labels, draw = synth.draw_training_task(rng, family, self.vocabulary, self.rule_split)
        return FreshTask(family, rule, labels, draw)

    def copy_prompt(self, index: int, j: int = 0) -> PromptSpec:
        """Copy prompt `j` of task `index`: input = prefix + s, output = s, no demonstrations."""
        rng = self._rng(index, f"copy:{j}")
        prefix = [rng.choice(self.copy_words) for _ in range(rng.randint(*COPY_PREFIX_WORDS))]
        copied = [rng.choice(self.copy_words) for _ in range(rng.randint(*COPY_STRING_WORDS))]
        name = f"fresh_{COPY}"
        return PromptSpec(name, (), Example(name, " ".join(prefix + copied), " ".join(copied), ()))

    def _examples(self, task: FreshTask, index: int, n: int) -> list[Example]:
        assert task.draw is not None
        rng = self._rng(index, "examples")
        examples = []
        for _ in range(n):
            text, output, options = task.draw(rng)
            examples.append(Example(task.name, text, output, tuple(options)))
        return examples

    def prompt_at(self, index: int) -> PromptSpec:
        """Prompt `index` of the MetaICL stream: its own task, k demonstrations + a target."""
        task = self.task_at(index)
        if task.family == COPY:
            return self.copy_prompt(index)
        *demonstrations, target = self._examples(task, index, self.k + 1)
        return PromptSpec(task.name, tuple(demonstrations), target)

    def task_prompts(self, index: int, n: int) -> list[PromptSpec]:
        """n prompts of ONE task (a MAML task: its support and query batches share it); n
        distinct targets, each with k demonstrations drawn from the task's other examples."""
        task = self.task_at(index)
        if task.family == COPY:
            return [self.copy_prompt(index, j) for j in range(n)]
        pool = self._examples(task, index, self.k + n)
        prompts = []
        for j in range(n):
            others = pool[:j] + pool[j + 1 :]
            demonstrations = self._rng(index, f"demonstrations:{j}").sample(others, self.k)
            prompts.append(PromptSpec(task.name, tuple(demonstrations), pool[j]))
        return prompts


class FreshPromptSampler:
    """MetaICL's stream of fresh prompts (the interface of sampler.MetaICLSampler); the state is
    the number of prompts drawn."""

    def __init__(self, tasks: FreshTasks):
        self.tasks = tasks
        self.position = 0

    def take(self, count: int) -> list[PromptSpec]:
        """The next `count` prompts of the stream (all ranks' share), advancing the state."""
        prompts = [self.tasks.prompt_at(self.position + i) for i in range(count)]
        self.position += count
        return prompts

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position = int(state["position"])


class FreshTaskSampler:
    """MAML tasks (the interface of sampler.TaskSampler): task t is ONE fresh task whose
    support and query batches share it; the state is the number of tasks drawn."""

    def __init__(self, tasks: FreshTasks):
        self.tasks = tasks
        self.num_drawn = 0

    def take(self, *, num_batches: int, batch_size: int) -> list[list[PromptSpec]]:
        prompts = self.tasks.task_prompts(self.num_drawn, num_batches * batch_size)
        self.num_drawn += 1
        return [prompts[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]

    def state_dict(self) -> dict[str, int]:
        return {"num_drawn": self.num_drawn}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.num_drawn = int(state["num_drawn"])
