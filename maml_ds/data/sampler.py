"""Deterministic, resumable samplers for meta-training prompts.

A *prompt* is one target example plus k OTHER examples of the same task as demonstrations,
in random order (MetaICL). Every draw is a pure function of (seed, epoch, position), so the
sampler's whole state is two integers, saved in the checkpoint, and every rank can compute any
rank's prompts (which makes a global per-token loss normalisation free of communication).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from maml_ds.data.reader import Example
from maml_ds.data.tasks import DataError


@dataclass(frozen=True)
class PromptSpec:
    """One meta-training instance: demonstrations (in prompt order) and the target."""

    task: str
    demonstrations: tuple[Example, ...]
    target: Example


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0
    """Index of the next prompt in this epoch's permutation."""


def _draw_demonstrations(
    rng: np.random.Generator, examples: Sequence[Example], target_index: int, k: int
) -> tuple[Example, ...]:
    """k distinct examples of ``examples`` other than ``target_index``, in random order."""
    others = rng.choice(len(examples) - 1, size=k, replace=False)
    others = [int(i) + (int(i) >= target_index) for i in others]  # skip the target itself
    return tuple(examples[i] for i in others)


def check_task_sizes(tasks: Mapping[str, Sequence[Example]], num_demonstrations: int) -> None:
    """Every task needs k demonstrations besides its target."""
    if not tasks:
        raise DataError("no training tasks: the setting's train list is empty")
    small = {t: len(ex) for t, ex in tasks.items() if len(ex) < num_demonstrations + 1}
    if small:
        listed = ", ".join(f"{t} ({n} lines)" for t, n in sorted(small.items()))
        raise DataError(
            f"training tasks need at least k+1 = {num_demonstrations + 1} examples (k "
            f"demonstrations + the target); too few in: {listed}. Use more data or a smaller --k"
        )


class MetaICLSampler:
    """MetaICL's stream: every training example of every task once per epoch, shuffled.

    Prompt ``i`` of epoch ``e`` is target ``perm_e[i]`` with k demonstrations drawn from a
    generator seeded by (seed, e, i).
    """

    def __init__(
        self, tasks: Mapping[str, Sequence[Example]], *, num_demonstrations: int, seed: int
    ):
        check_task_sizes(tasks, num_demonstrations)
        self.tasks = {name: list(tasks[name]) for name in sorted(tasks)}
        self.num_demonstrations = num_demonstrations
        self.seed = seed
        self._index = [(name, i) for name, ex in self.tasks.items() for i in range(len(ex))]
        self.state = SamplerState()
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._index)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._index))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def prompt_at(self, epoch: int, position: int) -> PromptSpec:
        task, target_index = self._index[int(self._permutation(epoch)[position])]
        examples = self.tasks[task]
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        demos = _draw_demonstrations(rng, examples, target_index, self.num_demonstrations)
        return PromptSpec(task, demos, examples[target_index])

    def take(self, count: int) -> list[PromptSpec]:
        """The next ``count`` prompts of the stream (all ranks' share), advancing the state."""
        out = []
        for _ in range(count):
            if self.state.position >= len(self._index):
                self.state = SamplerState(self.state.epoch + 1, 0)
            out.append(self.prompt_at(self.state.epoch, self.state.position))
            self.state.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.state = SamplerState(int(state["epoch"]), int(state["position"]))


class TaskSampler:
    """MAML tasks: each task is drawn from ONE training dataset (uniform over datasets) and
    yields ``num_batches`` disjoint batches of ``batch_size`` prompts each (support batches
    first, then query batches), every target distinct; demonstrations come from the same
    dataset and never include that prompt's target.

    Task ``t`` is a pure function of (seed, t); the state is the number of tasks drawn.
    """

    def __init__(
        self, tasks: Mapping[str, Sequence[Example]], *, num_demonstrations: int, seed: int
    ):
        check_task_sizes(tasks, num_demonstrations)
        self.tasks = {name: list(tasks[name]) for name in sorted(tasks)}
        self.names = list(self.tasks)
        self.num_demonstrations = num_demonstrations
        self.seed = seed
        self.num_drawn = 0

    def task_at(self, index: int, *, num_batches: int, batch_size: int) -> list[list[PromptSpec]]:
        rng = np.random.default_rng([self.seed, index, 2])
        name = self.names[int(rng.integers(len(self.names)))]
        examples = self.tasks[name]
        needed = num_batches * batch_size
        if needed > len(examples):
            raise DataError(
                f"task {name} has {len(examples)} examples but one MAML task needs {needed} "
                f"distinct targets ({num_batches} batches x {batch_size} prompts); use smaller "
                "batches or fewer inner steps"
            )
        targets = rng.choice(len(examples), size=needed, replace=False)
        prompts = [
            PromptSpec(
                name,
                _draw_demonstrations(rng, examples, int(t), self.num_demonstrations),
                examples[int(t)],
            )
            for t in targets
        ]
        return [prompts[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]

    def take(self, *, num_batches: int, batch_size: int) -> list[list[PromptSpec]]:
        batches = self.task_at(self.num_drawn, num_batches=num_batches, batch_size=batch_size)
        self.num_drawn += 1
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"num_drawn": self.num_drawn}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.num_drawn = int(state["num_drawn"])


def subsample_stratified(
    examples: Sequence[Example], fraction: float, *, seed: int, stratify: bool = True
) -> list[Example]:
    """Keep ``fraction`` of a task's examples (paper 5.1, limited data), keeping label
    proportions: each label keeps floor or ceil of ``fraction`` x its count (largest
    remainders first), the total is round(fraction x N) (at least 1). Deterministic for a seed;
    the original order is kept. ``stratify=False`` (free-form tasks) samples uniformly.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or not examples:
        return list(examples)
    rng = np.random.default_rng([seed, 3])
    total = max(1, round(fraction * len(examples)))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.output if stratify else ""].append(i)
    labels = sorted(groups)
    exact = {lab: fraction * len(groups[lab]) for lab in labels}
    quota = {lab: int(np.floor(exact[lab])) for lab in labels}
    # Largest remainder; ties broken by a seeded shuffle of the labels.
    order = sorted(labels, key=lambda lab: (-(exact[lab] - quota[lab]), rng.random()))
    for lab in order[: max(0, total - sum(quota.values()))]:
        quota[lab] += 1
    keep: list[int] = []
    for lab in labels:
        chosen = rng.choice(len(groups[lab]), size=quota[lab], replace=False)
        keep.extend(groups[lab][int(c)] for c in chosen)
    return [examples[i] for i in sorted(keep)]
