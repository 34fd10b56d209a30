"""Is a data folder complete for a setting? Everything a run would trip on, found up front.

Contract: `check_setting` reads every file a run of the setting reads, with the reader's own
rules, and collects every problem (`CheckReport.problems`, each naming the file or task and the
fix) instead of stopping at the first; `launch` refuses to start a job while there is one.
Warnings (train/test overlap, a task both trained and tested on) are reported, never fatal.
docs/data.md ("data check").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maml_ds.data.reader import (
    TEST_SEEDS,
    load_examples,
    load_meta_train_examples,
    task_file,
)
from maml_ds.data.registry import REGISTRY
from maml_ds.data.tasks import DataError, Setting, load_setting, load_task_config

__all__ = ["CheckReport", "TaskCounts", "check_setting"]

_K = re.compile(r"^.+_(\d+)_\d+_(?:train|dev|test)\.jsonl$")


@dataclass
class TaskCounts:
    """Lines found for one task."""

    num_train: int = 0
    """Meta-training task: lines of its training file."""
    num_demonstrations: dict[int, int] = field(default_factory=dict)
    """Target task: seed -> lines of `_train` (k expected)."""
    num_test: int = 0
    """Target task: lines of the test file (the same for every seed)."""
    num_overlap: int = 0
    """Target task: demonstrations (over all seeds) whose input is also a test input."""


@dataclass
class CheckReport:
    """Everything `check_setting` found; `ok` when nothing stops a run."""

    setting: str
    data_dir: Path
    k: int
    seeds: tuple[int, ...]
    problems: list[str] = field(default_factory=list)
    """What stops a run: each names the file (and line), task or seed, and the fix."""
    warnings: list[str] = field(default_factory=list)
    """What a run survives but a reader of its results should know."""
    train: dict[str, TaskCounts] = field(default_factory=dict)
    test: dict[str, TaskCounts] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_target_task(report: CheckReport, task: str) -> None:
    data_dir, k = report.data_dir, report.k
    counts = report.test.setdefault(task, TaskCounts())
    try:
        config = load_task_config(task, data_dir)
    except DataError as e:
        report.problems.append(str(e))
        return
    if not (data_dir / task).is_dir():
        how = (
            f"build it with `maml-ds data build --tasks {task} --out {data_dir}`"
            if task in REGISTRY
            else "import it with `maml-ds data import` (no registry entry for it)"
        )
        report.problems.append(f"task {task!r}: no folder {data_dir / task}; {how}")
        return
    if not any(task_file(data_dir, task, k, s, "train").is_file() for s in report.seeds):
        found = sorted({int(m[1]) for p in (data_dir / task).iterdir() if (m := _K.match(p.name))})
        report.problems.append(
            f"task {task!r}: no files for k={k} in {data_dir / task} (found k={found}); "
            "pass the k of its files (--k) or rebuild the task"
        )
        return
    test_texts: dict[int, str] = {}
    test_inputs: set[str] = set()
    for seed in report.seeds:
        if not task_file(data_dir, task, k, seed, "dev").is_file():
            report.warnings.append(
                f"{task_file(data_dir, task, k, seed, 'dev')}: missing (unused by maml-ds)"
            )
        try:
            demos = load_examples(data_dir, task, k=k, seed=seed, split="train")
            tests = load_examples(data_dir, task, k=k, seed=seed, split="test", task_config=config)
        except DataError as e:
            report.problems.append(str(e))
            continue
        counts.num_demonstrations[seed] = len(demos)
        if len(demos) != k:
            report.problems.append(
                f"{task_file(data_dir, task, k, seed, 'train')}: {len(demos)} demonstrations, "
                f"expected k={k}; rebuild the task or pass the k of its files (--k)"
            )
        test_texts[seed] = task_file(data_dir, task, k, seed, "test").read_text(encoding="utf-8")
        if not test_inputs:
            test_inputs = {e.input for e in tests}
            counts.num_test = len(tests)
        counts.num_overlap += sum(e.input in test_inputs for e in demos)
    if len(set(test_texts.values())) > 1:
        report.warnings.append(
            f"task {task!r}: the test file differs between seeds {sorted(test_texts)} "
            "(MetaICL's test set is the same for every seed)"
        )
    if counts.num_overlap:
        report.warnings.append(
            f"task {task!r}: {counts.num_overlap} demonstration(s) over {len(test_texts)} seeds "
            "have the input of a test example"
        )


def _check_train_task(report: CheckReport, task: str, num_demonstrations: int) -> None:
    # each meta-training instance draws k OTHER examples of its task as demonstrations
    try:
        examples = load_meta_train_examples(
            report.data_dir, task, min_examples=num_demonstrations + 1
        )
    except DataError as e:
        report.problems.append(str(e))
        return
    report.train[task] = TaskCounts(num_train=len(examples))


def check_setting(
    data_dir: Path | str,
    setting: Setting | str | Path,
    *,
    k: int = 16,
    seeds: Sequence[int] = TEST_SEEDS,
    include_test: bool = True,
    include_train: bool = True,
    num_train_demonstrations: int | None = None,
) -> CheckReport:
    """Check every target task of `setting` (its `{task}_{k}_{seed}_{train,test}.jsonl`: k
    demonstrations per seed, the test file, options) and every meta-training task (its
    `{task}_16384_100_train.jsonl`, with at least `num_train_demonstrations` + 1 lines; default
    k + 1), or only one of the two kinds.

    Never raises for a problem of the data: each becomes a line of `report.problems`.
    """
    data_dir = Path(data_dir)
    name = setting.name if isinstance(setting, Setting) else str(setting)
    report = CheckReport(setting=name, data_dir=data_dir, k=k, seeds=tuple(seeds))
    if not data_dir.is_dir():
        report.problems.append(f"data directory not found: {data_dir}")
        return report
    try:
        if not isinstance(setting, Setting):
            setting = load_setting(setting, data_dir)
    except DataError as e:
        report.problems.append(str(e))
        return report
    report.setting = name = setting.name
    if include_test:
        for task in setting.test:
            _check_target_task(report, task)
    if include_train:
        train_k = k if num_train_demonstrations is None else num_train_demonstrations
        for task in setting.train:
            _check_train_task(report, task, train_k)
    for task in setting.overlap():
        report.warnings.append(
            f"task {task!r} is both a meta-training and a target task of setting {name!r} "
            "(as in MetaICL's own files); its test scores are not held-out scores"
        )
    return report
