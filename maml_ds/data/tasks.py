"""Settings (which tasks meta-train, which evaluate) and per-task label configs.

Both come as the MetaICL JSON files: `config/{setting}.json` with the keys `train`, `test`,
`unseen_domain_test` (and `validation`, which the synthetic suite adds), and
`config/tasks/{task}.json` with `task_type` and `options`. The original MetaICL files ship as
package data in `maml_ds/data/metaicl_config/` (verbatim copies); a data folder may carry its own
`config/` (the synthetic suite writes one), which is looked up first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "DataError",
    "Setting",
    "TaskConfig",
    "TaskType",
    "available_settings",
    "load_setting",
    "load_task_config",
]

TaskType = Literal["classification", "multi-choice", "free-form"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)

_SETTING_KEYS = ("train", "test", "unseen_domain_test", "validation")
_REQUIRED_SETTING_KEYS = ("train", "test")


class DataError(ValueError):
    """A problem with user data or configuration: the message names what, where, and the fix."""


def _builtin_config() -> Traversable:
    """The MetaICL config folder shipped inside the package."""
    return resources.files("maml_ds.data") / "metaicl_config"


def _data_config(data_dir: Path | str | None) -> Path | None:
    return None if data_dir is None else Path(data_dir) / "config"


def check_task_name(task: str) -> None:
    """Task names become folder and file names: refuse ones that would escape the data folder."""
    if not isinstance(task, str) or not task or "/" in task or "\\" in task or task in (".", ".."):
        raise DataError(
            f"invalid task name {task!r}: a task name is a single folder name "
            "(no '/', '\\', '.' or '..'), e.g. 'glue-sst2' or 'unifiedqa:mctest'"
        )


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Setting:
    """One MetaICL setting: the meta-training tasks and the target (test) tasks."""

    name: str
    """Setting name (the file's stem), e.g. "hr_to_lr"."""
    train: tuple[str, ...]
    """Meta-training tasks (data: `{task}_16384_100_train.jsonl`)."""
    test: tuple[str, ...]
    """Target tasks (data: `{task}_16_{seed}_{train,test}.jsonl` for the 5 seeds)."""
    unseen_domain_test: tuple[str, ...] = ()
    """The subset of target tasks from domains unseen in meta-training (MetaICL's table)."""
    validation: tuple[str, ...] = ()
    """Tasks drawn like the target tasks but distinct from them, for choosing lr and steps
    (data: as target tasks); MetaICL's own settings have none."""

    def overlap(self) -> tuple[str, ...]:
        """Tasks that are both meta-training and target tasks, in `test` order.

        MetaICL's own non_nli_to_nli has one (`sick`); it is kept as published, and callers
        should warn about it rather than drop it silently.
        """
        train = set(self.train)
        return tuple(t for t in self.test if t in train)

    def all_tasks(self) -> tuple[str, ...]:
        """Every task named by the setting, without repeats, train tasks first."""
        return tuple(
            dict.fromkeys(self.train + self.test + self.unseen_domain_test + self.validation)
        )


def _read_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None


def _parse_setting(raw: Any, name: str, where: str) -> Setting:
    if not isinstance(raw, dict):
        raise DataError(
            f"{where}: a setting file must be a JSON object with keys {list(_SETTING_KEYS)}, "
            f"got {type(raw).__name__}"
        )
    problems: list[str] = []
    unknown = sorted(set(raw) - set(_SETTING_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; allowed keys are {list(_SETTING_KEYS)}")
    for key in _REQUIRED_SETTING_KEYS:
        if key not in raw:
            problems.append(f"missing key {key!r} (a list of task names)")
    lists: dict[str, tuple[str, ...]] = {}
    for key in _SETTING_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            problems.append(f"{key!r} must be a list of non-empty task-name strings")
            continue
        dups = sorted({t for t in value if value.count(t) > 1})
        if dups:
            problems.append(f"{key!r} lists task(s) more than once: {dups}")
        for t in value:
            try:
                check_task_name(t)
            except DataError as e:
                problems.append(f"{key!r}: {e}")
        lists[key] = tuple(value)
    if "test" in lists and not lists["test"]:
        problems.append("'test' is empty: a setting needs at least one target task")
    for key in _REQUIRED_SETTING_KEYS:
        shared = sorted(set(lists.get("validation", ())) & set(lists.get(key, ())))
        if shared:
            problems.append(f"'validation' task(s) also in {key!r}: {shared}")
    if problems:
        raise DataError(f"{where}: invalid setting:\n  - " + "\n  - ".join(problems))
    return Setting(
        name=name,
        train=lists["train"],
        test=lists["test"],
        unseen_domain_test=lists.get("unseen_domain_test", ()),
        validation=lists.get("validation", ()),
    )


def available_settings(data_dir: Path | str | None = None) -> list[str]:
    """Names of the settings `load_setting` finds: the data folder's `config/` and the built-ins."""
    names = {
        p.name[: -len(".json")] for p in _builtin_config().iterdir() if p.name.endswith(".json")
    }
    cfg = _data_config(data_dir)
    if cfg is not None and cfg.is_dir():
        names |= {p.stem for p in cfg.glob("*.json")}
    return sorted(names)


def load_setting(name_or_path: str | Path, data_dir: Path | str | None = None) -> Setting:
    """Load a setting by path (`*.json`) or name.

    A name is looked up in `{data_dir}/config/{name}.json` first (the synthetic suite writes its
    settings there), then among MetaICL's built-in settings.
    """
    text_value = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path) or text_value.endswith(".json") or "/" in text_value
    )
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise DataError(
                f"setting file not found: {path}. Pass an existing .json file or one of the "
                f"setting names: {', '.join(available_settings(data_dir))}"
            )
        return _parse_setting(
            _read_json(path.read_text(encoding="utf-8"), str(path)), path.stem, str(path)
        )

    name = text_value
    cfg = _data_config(data_dir)
    if cfg is not None and (cfg / f"{name}.json").is_file():
        path = cfg / f"{name}.json"
        return _parse_setting(
            _read_json(path.read_text(encoding="utf-8"), str(path)), name, str(path)
        )
    builtin = _builtin_config() / f"{name}.json"
    if builtin.is_file():
        where = f"<built-in MetaICL config>/{name}.json"
        return _parse_setting(_read_json(builtin.read_text(encoding="utf-8"), where), name, where)
    searched = f"{cfg}/ and " if cfg is not None else ""
    raise DataError(
        f"unknown setting {name!r} (searched {searched}the built-in MetaICL settings). "
        f"Available settings: {', '.join(available_settings(data_dir))}; or pass a path to a "
        "setting .json file"
    )


# ---------------------------------------------------------------------------------------------
# Task configs


@dataclass(frozen=True)
class TaskConfig:
    """How a task is scored: macro-F1 for classification, accuracy otherwise."""

    task_type: TaskType
    """classification (fixed label list), multi-choice (options per example), free-form
    (no options; meta-training only)."""
    options: tuple[str, ...] | None
    """The fixed label list of a classification task; None for the other types."""

    @property
    def is_classification(self) -> bool:
        return self.task_type == "classification"


def _parse_task_config(raw: Any, task: str, where: str) -> TaskConfig:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a task config must be a JSON object, got {type(raw).__name__}")
    problems: list[str] = []
    task_type = raw.get("task_type")
    if task_type not in TASK_TYPES:
        problems.append(f"'task_type' must be one of {list(TASK_TYPES)}, got {task_type!r}")
    options = raw.get("options")
    if options is not None and (
        not isinstance(options, list) or not all(isinstance(o, str) for o in options)
    ):
        problems.append(f"'options' must be a list of strings or null, got {options!r}")
        options = None
    if task_type == "classification" and (options is None or len(options) < 2):
        problems.append("a classification task needs 'options': a list of at least 2 labels")
    unknown = sorted(set(raw) - {"task_type", "options"})
    if unknown:
        problems.append(f"unknown key(s) {unknown}; allowed keys are ['task_type', 'options']")
    if problems:
        raise DataError(
            f"{where}: invalid config of task {task!r}:\n  - " + "\n  - ".join(problems)
        )
    return TaskConfig(task_type=task_type, options=None if options is None else tuple(options))


def load_task_config(task: str, data_dir: Path | str | None = None) -> TaskConfig:
    """`{data_dir}/config/tasks/{task}.json` if present, else MetaICL's built-in config."""
    check_task_name(task)
    cfg = _data_config(data_dir)
    if cfg is not None and (cfg / "tasks" / f"{task}.json").is_file():
        path = cfg / "tasks" / f"{task}.json"
        return _parse_task_config(
            _read_json(path.read_text(encoding="utf-8"), str(path)), task, str(path)
        )
    builtin = _builtin_config() / "tasks" / f"{task}.json"
    if builtin.is_file():
        where = f"<built-in MetaICL config>/tasks/{task}.json"
        return _parse_task_config(
            _read_json(builtin.read_text(encoding="utf-8"), where), task, where
        )
    local = f"{cfg / 'tasks' / (task + '.json')} nor " if cfg is not None else ""
    raise DataError(
        f"unknown task {task!r}: no task config in {local}MetaICL's built-in task configs. "
        f'Write {{"task_type": "classification" | "multi-choice" | "free-form", "options": '
        f"[...] or null}} to <data_dir>/config/tasks/{task}.json"
    )
