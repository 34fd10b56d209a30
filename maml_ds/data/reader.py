"""Reading MetaICL-format task files: `data/{task}/{task}_{k}_{seed}_{split}.jsonl`.

Each line is `{"task": str, "input": str, "output": str, "options": [str, ...]}`. Every line is
parsed and checked in Python, so a bad line is reported as `file:line` with what is wrong (a
JSON reader would only report a byte offset). See docs/data.md.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from maml_ds.data.tasks import DataError, TaskConfig, check_task_name, load_task_config

__all__ = [
    "META_TRAIN_K",
    "META_TRAIN_SEED",
    "TEST_SEEDS",
    "Example",
    "find_meta_train_file",
    "load_examples",
    "load_meta_train_examples",
    "load_target_examples",
    "task_file",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "dev", "test"]
SPLITS: tuple[str, ...] = ("train", "dev", "test")
FIELDS: tuple[str, ...] = ("task", "input", "output", "options")

# MetaICL's file naming: target tasks use k=16 with these 5 seeds; meta-training tasks one file
# `{t}_16384_100_train.jsonl` holding up to 16384 lines.
TEST_SEEDS: tuple[int, ...] = (100, 13, 21, 42, 87)
META_TRAIN_K = 16384
META_TRAIN_SEED = 100

_HOW_TO_GET_DATA = (
    "Build MetaICL's tasks with `maml-ds data build --setting S --out DIR`, import your own "
    "with `maml-ds data import`, or create data with `maml-ds data synth --out DIR` (the "
    "offline synthetic suite), then point the data directory at that folder"
)


@dataclass(frozen=True)
class Example:
    """One line of a task file."""

    task: str
    """The task (dataset) this example belongs to: the task name it was loaded under."""
    input: str
    output: str
    options: tuple[str, ...]
    """Candidate outputs; empty for free-form tasks."""


def task_file(data_dir: Path | str, task: str, k: int, seed: int, split: str) -> Path:
    """`data_dir/{task}/{task}_{k}_{seed}_{split}.jsonl`."""
    check_task_name(task)
    return Path(data_dir) / task / f"{task}_{k}_{seed}_{split}.jsonl"


def _check_folder(data_dir: Path, task: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(
            f"data directory not found: {data_dir} (needed for task {task!r}). {_HOW_TO_GET_DATA}"
        )
    folder = data_dir / task
    if not folder.is_dir():
        raise DataError(
            f"no data for task {task!r}: folder {folder} does not exist. {_HOW_TO_GET_DATA}"
        )
    return folder


def _check_exists(path: Path, data_dir: Path, task: str) -> None:
    folder = _check_folder(data_dir, task)
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        listing = ", ".join(present[:20]) + (
            f", ... ({len(present)} files)" if len(present) > 20 else ""
        )
        raise DataError(
            f"missing file for task {task!r}: {path}. Files in {folder}: {listing or '(none)'}. "
            "Check k, seed and split, or regenerate the task's data"
        )


def _check_record(raw: Any, where: str) -> dict[str, Any]:
    """Check one parsed line; return the record with `options` as a list."""
    if not isinstance(raw, dict):
        raise DataError(
            f"{where}: expected a JSON object with fields {list(FIELDS)}, got {type(raw).__name__}"
        )
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; every line needs {list(FIELDS)} "
            '(free-form tasks use "options": [])'
        )
    for f in ("task", "input", "output"):
        if not isinstance(raw[f], str):
            raise DataError(f"{where}: field {f!r} must be a string, got {type(raw[f]).__name__}")
    options = raw["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: field 'options' must be a list of strings, got {options!r}")
    if options and raw["output"] not in options:
        raise DataError(f"{where}: output {raw['output']!r} is not one of the options {options}")
    return raw


def _check_test_record(rec: dict[str, Any], where: str, task: str, task_config: TaskConfig) -> None:
    options = rec["options"]
    if task_config.task_type == "free-form":
        raise DataError(
            f"{where}: task {task!r} is free-form (no options) and cannot be a target task: "
            "test examples are scored by ranking their options"
        )
    if task_config.task_type == "classification":
        expected = list(task_config.options or ())
        if options != expected:
            detail = (
                " (same labels, different order)" if sorted(options) == sorted(expected) else ""
            )
            raise DataError(
                f"{where}: options {options} differ from the options of classification task "
                f"{task!r} in its task config {expected}{detail}; fix the data or the task config"
            )
    if len(options) < 2:
        raise DataError(f"{where}: a test example needs at least 2 options to rank, got {options}")


def _read_records(
    path: Path, task: str, split: str, task_config: TaskConfig | None, min_examples: int | None
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():  # blank lines (e.g. a trailing one) carry nothing
                continue
            where = f"{path}:{line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rec = _check_record(raw, where)
            if split == "test":
                assert task_config is not None
                _check_test_record(rec, where, task, task_config)
            records.append(rec)
    if not records:
        raise DataError(f"{path}: the file has no examples (task {task!r})")
    if min_examples is not None and len(records) < min_examples:
        raise DataError(
            f"{path}: task {task!r} has {len(records)} examples, fewer than the {min_examples} "
            "needed; use a smaller k or regenerate the data with more examples"
        )
    return records


def _load_records(
    data_dir: Path | str,
    task: str,
    *,
    k: int,
    seed: int,
    split: str,
    task_config: TaskConfig | None,
    min_examples: int | None,
    path: Path | None = None,
) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    data_dir = Path(data_dir)
    if path is None:
        path = task_file(data_dir, task, k, seed, split)
    _check_exists(path, data_dir, task)
    if split == "test" and task_config is None:
        # The option check and the metric need the task's type: a target task must have a config.
        task_config = load_task_config(task, data_dir)
    return _read_records(path, task, split, task_config, min_examples)


def _to_example(task: str, rec: dict[str, Any]) -> Example:
    return Example(
        task=task, input=rec["input"], output=rec["output"], options=tuple(rec["options"])
    )


def load_examples(
    data_dir: Path | str,
    task: str,
    *,
    k: int,
    seed: int,
    split: Split,
    task_config: TaskConfig | None = None,
    min_examples: int | None = None,
) -> list[Example]:
    """Read and check `data_dir/{task}/{task}_{k}_{seed}_{split}.jsonl`.

    Every line is checked (fields, types, output among the options). For `split="test"` the
    task config is loaded from `data_dir` or the built-ins if not given, and each line must have
    at least 2 options, equal to the task's label list for classification tasks. `min_examples`
    (e.g. k for the demonstrations file) is a lower bound on the number of lines.
    Raises DataError naming the task, the file (and line) and the fix.
    """
    records = _load_records(
        data_dir,
        task,
        k=k,
        seed=seed,
        split=split,
        task_config=task_config,
        min_examples=min_examples,
    )
    return [_to_example(task, rec) for rec in records]


_TRAIN_FILE = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_train\.jsonl$")


def find_meta_train_file(
    data_dir: Path | str, task: str, *, seed: int = META_TRAIN_SEED, k: int = META_TRAIN_K
) -> Path:
    """The meta-training file of `task`: `{task}_{k}_{seed}_train.jsonl` if present, else the
    `{task}_{K}_{seed}_train.jsonl` with the largest K (a warning is logged).

    MetaICL's files hold "up to 16384" lines, so the line count is never checked against k.
    """
    data_dir = Path(data_dir)
    path = task_file(data_dir, task, k, seed, "train")
    if path.is_file():
        return path
    _check_folder(data_dir, task)
    candidates: list[tuple[int, Path]] = []
    for p in path.parent.iterdir():
        m = _TRAIN_FILE.match(p.name)
        if m and m["task"] == task and int(m["seed"]) == seed and p.is_file():
            candidates.append((int(m["k"]), p))
    if not candidates:
        _check_exists(path, data_dir, task)  # raises: missing file, listing the folder
    found_k, found = max(candidates)
    logger.warning(
        "task %r: %s not found; using %s (k=%d) as its meta-training data",
        task,
        path.name,
        found.name,
        found_k,
    )
    return found


def load_meta_train_examples(
    data_dir: Path | str,
    task: str,
    *,
    seed: int = META_TRAIN_SEED,
    k: int = META_TRAIN_K,
    min_examples: int | None = None,
) -> list[Example]:
    """All examples of a meta-training task (see `find_meta_train_file`).

    `k` is the k in the file name. For meta-training with m demonstrations per instance, pass
    `min_examples=m + 1` (m OTHER examples of the task are drawn for each one).
    """
    path = find_meta_train_file(data_dir, task, seed=seed, k=k)
    records = _load_records(
        data_dir,
        task,
        k=k,
        seed=seed,
        split="train",
        task_config=None,
        min_examples=min_examples,
        path=path,
    )
    return [_to_example(task, rec) for rec in records]


def load_target_examples(
    data_dir: Path | str,
    task: str,
    *,
    seed: int,
    k: int = 16,
    task_config: TaskConfig | None = None,
) -> tuple[list[Example], list[Example]]:
    """The k demonstrations (`_train`, exactly k lines) and the test set of a target task."""
    if task_config is None:
        task_config = load_task_config(task, data_dir)
    demos = load_examples(data_dir, task, k=k, seed=seed, split="train", min_examples=k)
    if len(demos) != k:
        path = task_file(data_dir, task, k, seed, "train")
        raise DataError(
            f"{path}: task {task!r} has {len(demos)} demonstrations, expected exactly k={k} "
            "(the file holds the k demonstrations of this seed)"
        )
    tests = load_examples(data_dir, task, k=k, seed=seed, split="test", task_config=task_config)
    return demos, tests
