"""Metrics of the MetaICL protocol and the paper's summary numbers.

Scores are fractions in [0, 1]; tables print them x100 as the papers do.

- `macro_f1` (classification tasks) and `accuracy` (every other task) score one task at one seed.
- `aggregate_seeds`: per seed, the mean over tasks; then the average and the worst seed
  ("avg/worst", paper Tables 2-4).
- `is_win` / `win_rate`: the paper's comparison (sec. 4.5): A wins over B on a setting when BOTH
  its average and its worst case are higher.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "SeedAggregate",
    "WinRate",
    "accuracy",
    "aggregate_seeds",
    "is_win",
    "macro_f1",
    "task_score",
    "win_rate",
]


def _check_lengths(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        raise ValueError("no examples to score")


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Share of exact matches."""
    _check_lengths(predictions, golds)
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / len(golds)


def macro_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """MetaICL's macro-F1: the mean F1 over the labels that occur in the GOLD set.

    Precision of a label = share of correct among the predictions of it, 1.0 when it is never
    predicted; recall = share of its gold items predicted correctly; F1 = 2PR/(P+R), 0 when
    P+R = 0. A label that is predicted but never gold counts nowhere (its wrong predictions
    still lower the recall of the gold labels they took).
    """
    _check_lengths(predictions, golds)
    gold_count = Counter(golds)
    predicted_count = Counter(predictions)
    correct = Counter(g for p, g in zip(predictions, golds, strict=True) if p == g)
    f1s = []
    for label in gold_count:  # insertion order: first occurrence in golds
        precision = correct[label] / predicted_count[label] if predicted_count[label] else 1.0
        recall = correct[label] / gold_count[label]
        total = precision + recall
        f1s.append(0.0 if total == 0 else 2 * precision * recall / total)
    return sum(f1s) / len(f1s)


def task_score(predictions: Sequence[str], golds: Sequence[str], *, classification: bool) -> float:
    """Macro-F1 for a classification task, accuracy otherwise (the protocol's metric)."""
    return macro_f1(predictions, golds) if classification else accuracy(predictions, golds)


@dataclass(frozen=True)
class SeedAggregate:
    """The summary of one setting over seeds."""

    per_seed: dict[int, float]
    """seed -> mean score over the tasks at that seed."""
    average: float
    """Mean of `per_seed` (the paper's X in "X/Y")."""
    worst: float
    """Lowest of `per_seed` (the paper's Y in "X/Y")."""
    worst_task_mean: float
    """Mean over tasks of each task's worst seed: the "worst" of MetaICL's README, which is
    lower than or equal to `worst`; kept for comparison with MetaICL's published numbers."""


def aggregate_seeds(scores: Mapping[str, Mapping[int, float]]) -> SeedAggregate:
    """task -> seed -> score into per-seed means, their average and worst.

    Every task must have a score for the same seeds (a missing one would silently bias a mean).
    """
    if not scores:
        raise ValueError("no task scores to aggregate")
    tasks = list(scores)
    seeds = list(scores[tasks[0]])
    if not seeds:
        raise ValueError(f"task {tasks[0]!r} has no seed scores")
    for task in tasks:
        if set(scores[task]) != set(seeds):
            raise ValueError(
                f"task {task!r} has scores for seeds {sorted(scores[task])}, task {tasks[0]!r} "
                f"for {sorted(seeds)}: every task needs the same seeds"
            )
        for seed, value in scores[task].items():
            if not math.isfinite(value):
                raise ValueError(f"task {task!r}, seed {seed}: score {value} is not finite")
    per_seed = {seed: sum(scores[t][seed] for t in tasks) / len(tasks) for seed in seeds}
    return SeedAggregate(
        per_seed=per_seed,
        average=sum(per_seed.values()) / len(per_seed),
        worst=min(per_seed.values()),
        worst_task_mean=sum(min(scores[t].values()) for t in tasks) / len(tasks),
    )


def is_win(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """A = (average, worst) wins over B when both numbers are strictly higher (paper 4.5)."""
    return a[0] > b[0] and a[1] > b[1]


@dataclass(frozen=True)
class WinRate:
    wins: int
    num_settings: int
    """Settings both methods were evaluated on."""

    @property
    def rate(self) -> float:
        return self.wins / self.num_settings if self.num_settings else math.nan


def win_rate(a: Mapping[str, tuple[float, float]], b: Mapping[str, tuple[float, float]]) -> WinRate:
    """Wins of A over B over the settings both have: setting -> (average, worst)."""
    common = [s for s in a if s in b]
    return WinRate(sum(is_win(a[s], b[s]) for s in common), len(common))
