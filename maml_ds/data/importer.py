"""A user's own task (a CSV/TSV/JSONL/Parquet file or a Hugging Face dataset) -> MetaICL files.

Contract: rows become `{task, input, output, options}` lines through a `TaskRecipe` (an input
template, a label field and a label map); a row whose label is not among the options is dropped
and counted in the `ImportSummary`, never kept. The demonstrations are sampled per seed and the
test set is the same for every seed, with MetaICL's sampling rules. docs/data.md has the rules and
where they come from.
"""

from __future__ import annotations

import csv
import json
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maml_ds.data.reader import SPLITS, TEST_SEEDS, task_file
from maml_ds.data.tasks import DataError, TaskConfig, check_task_name, load_task_config
from maml_ds.files import write_atomic

__all__ = [
    "HF_PREFIX",
    "HOLD_OUT_TRAIN_FRACTION",
    "HOLD_OUT_SEED",
    "ImportSummary",
    "SplitCounts",
    "Table",
    "TaskRecipe",
    "hold_out_test",
    "import_task",
    "load_source",
    "load_splits",
    "parse_label_map",
    "sample_demonstrations",
    "task_config_file",
]

HF_PREFIX = "hf:"
"""A source written `hf:ID` is a Hugging Face hub dataset (downloaded: the user named it)."""
FILE_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": "jsonl", ".parquet": "parquet"}

# MetaICL's rule for a dataset without a labelled test split: shuffle its rows with seed 42, the
# first int(0.8 n) are the training rows, the rest the test set (its financial_phrasebank,
# medical_questions_pairs, climate_fever, hate_speech18 and ethos scripts).
HOLD_OUT_SEED = 42
HOLD_OUT_TRAIN_FRACTION = 0.8


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Table:
    """The rows of one split of a source, and what names its labels."""

    rows: list[dict[str, Any]]
    where: str
    """The file, folder or hub id (and split), for messages."""
    class_label_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Per column, the names of a `datasets.ClassLabel` (the stored value is an index)."""

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []


def _read_delimited(path: Path, delimiter: str, columns: Sequence[str] | None) -> list[dict]:
    # TSV as tab-split lines, no quoting (the poem_sentiment files hold bare '"'); CSV quoted.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = list(columns) if columns else next(reader, None)
        if not header:
            raise DataError(f"{path}: the file is empty")
        rows = []
        for values in reader:
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(values)} fields, expected {len(header)} "
                    f"({', '.join(header)}); fix the line or pass --columns"
                )
            rows.append(dict(zip(header, values, strict=True)))
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_file(path: Path, columns: Sequence[str] | None) -> Table:
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; use one of "
            f"{', '.join(FILE_FORMATS)}, a saved Hugging Face dataset folder or hf:ID"
        )
    if columns and kind in ("jsonl", "parquet"):
        raise DataError(f"{path}: --columns names the columns of a CSV/TSV file without header")
    if kind == "jsonl":
        rows = _read_jsonl(path)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = _read_delimited(path, kind, columns)
    return Table(rows=rows, where=str(path))


def _from_hf(dataset: Any, where: str, split: str | None) -> Table:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split is None and "train" in dataset:
            split = "train"
        if split is None or split not in dataset:
            raise DataError(
                f"{where}: {'no split ' + repr(split) if split else 'pick a split'}; "
                f"its splits are {list(dataset)}"
            )
        dataset, where = dataset[split], f"{where}[{split}]"
    names = {
        name: tuple(feature.names)
        for name, feature in dataset.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    return Table(rows=dataset.to_list(), where=where, class_label_names=names)


def _load_hf(source: str, config: str | None) -> Any:
    """A hub dataset (`hf:ID`, downloaded) or a local folder (`save_to_disk`, or data files)."""
    import datasets

    try:
        if source.startswith(HF_PREFIX):
            return datasets.load_dataset(source[len(HF_PREFIX) :], config)
        try:
            return datasets.load_from_disk(source)
        except FileNotFoundError:  # not a save_to_disk folder: a folder of data files
            return datasets.load_dataset(source, config)
    except Exception as e:  # a download or format failure: the user's to see, in one line
        raise DataError(f"{source}: could not load the dataset ({type(e).__name__}: {e})") from None


def load_splits(
    source: str | Path,
    splits: Sequence[str | None],
    *,
    config: str | None = None,
    columns: Sequence[str] | None = None,
) -> list[Table]:
    """The rows of `splits` of one source: a local file (one split: pass [None]), a local
    Hugging Face dataset folder, or `hf:ID` (a hub download).

    `config` is the dataset's config name; `columns` names the columns of a CSV/TSV file that
    has no header line.
    """
    text = str(source)
    path = Path(source)
    if not text.startswith(HF_PREFIX) and path.is_file():
        if any(s is not None for s in splits):
            raise DataError(f"{path}: a file holds one split; give the test rows as another file")
        return [_read_file(path, columns) for _ in splits]
    if not text.startswith(HF_PREFIX) and not path.is_dir():
        raise DataError(
            f"source not found: {path} (a CSV/TSV/JSONL/Parquet file, a saved Hugging Face "
            f"dataset folder, or {HF_PREFIX}ID for a hub dataset)"
        )
    if columns:
        raise DataError(f"{text}: --columns names the columns of a CSV/TSV file without header")
    dataset = _load_hf(text, config)
    return [_from_hf(dataset, text, split) for split in splits]


def load_source(
    source: str | Path,
    *,
    split: str | None = None,
    config: str | None = None,
    columns: Sequence[str] | None = None,
) -> Table:
    """The rows of one split of a source (`load_splits`)."""
    return load_splits(source, [split], config=config, columns=columns)[0]


# ---------------------------------------------------------------------------------------------
# Rows -> examples


def parse_label_map(text: str | None) -> dict[str, str] | None:
    """`"-1=negative,0=no_impact"` -> {"-1": "negative", "0": "no_impact"} (None stays None)."""
    if text is None:
        return None
    mapping: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataError(f"--label-map: {item!r} is not VALUE=LABEL (e.g. '0=negative')")
        mapping[key.strip()] = value.strip()
    return mapping


@dataclass(frozen=True)
class TaskRecipe:
    """How the rows of a source become the lines of a MetaICL task."""

    task: str
    """The task name: the folder, the file prefix and the `task` field of every line."""
    input_template: str
    """The input, with `{field}` for a field's value, e.g. `"question 1: {q1} [SEP] question 2:
    {q2}"` (`{{`/`}}` for literal braces)."""
    label_field: str
    """The field holding the label (classification) or the answer (multi-choice)."""
    label_map: Mapping[str, str] | None = None
    """Stored label value (as text; a ClassLabel's index) -> output. None: the value itself (a
    ClassLabel's name). A value missing from the map is dropped and counted."""
    options: tuple[str, ...] | None = None
    """The classification labels. None: the task's config (the data folder's, then MetaICL's),
    else the sorted set of mapped labels."""
    options_field: str | None = None
    """Multi-choice: the field holding each row's list of options (`a.b` for a nested field,
    e.g. `choices.text`); the label is an option's text or index. The task is multi-choice."""
    option_keys_field: str | None = None
    """Multi-choice: the field holding each option's key (e.g. `choices.label`: A, B, ...) when
    the label is a key (e.g. `answerKey`)."""
    replace: Mapping[str, str] = field(default_factory=dict)
    """Text replaced in every field value before it enters the template (e.g. {"\\n": " "}: some
    of MetaICL's task scripts put newlines to spaces)."""

    def template_fields(self) -> list[str]:
        try:
            parsed = list(string.Formatter().parse(self.input_template))
        except ValueError as e:
            raise DataError(f"input template {self.input_template!r}: {e}") from None
        return [name for _, name, _, _ in parsed if name is not None]


def _check_fields(recipe: TaskRecipe, table: Table) -> None:
    if not table.rows:
        raise DataError(f"{table.where}: no rows")
    fields = recipe.template_fields()
    if "" in fields or any(f.isdigit() for f in fields):
        raise DataError(
            f"input template {recipe.input_template!r}: name each field, e.g. '{{question}}'"
        )
    nested = [recipe.options_field, recipe.option_keys_field]
    for name in [*fields, recipe.label_field, *(f.split(".")[0] for f in nested if f)]:
        if name not in table.columns:
            raise DataError(
                f"{table.where}: unknown field {name!r} in the recipe of task {recipe.task!r}; "
                f"the fields are {table.columns}"
            )


def _clean_input(text: str) -> str:
    # MetaICL's preprocessing of every input: strip, and a literal backslash-n becomes a space.
    return text.strip().replace("\\n", " ")


@dataclass
class SplitCounts:
    """What happened to the rows of one split."""

    num_rows: int = 0
    num_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Reason (naming the label) -> number of rows dropped for it."""

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def describe(self) -> str:
        text = f"{self.num_kept}/{self.num_rows} rows kept"
        if self.dropped:
            text += "; dropped: " + "; ".join(f"{n} x {why}" for why, n in self.dropped.items())
        return text


def _nested_list(row: dict[str, Any], path: str) -> list[Any]:
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, list | tuple):
        raise DataError(f"field {path!r} must hold a list, got {type(value).__name__}")
    return list(value)


def _label_output(value: Any, recipe: TaskRecipe, names: tuple[str, ...] | None) -> str | None:
    key = str(value)
    if recipe.label_map is not None:
        return recipe.label_map.get(key)
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return key.strip()


def _to_lines(
    table: Table, recipe: TaskRecipe, options: tuple[str, ...] | None
) -> tuple[list[dict[str, Any]], SplitCounts]:
    """The kept examples of a split (in source order) and the counts of what was dropped."""
    counts = SplitCounts(num_rows=len(table.rows))
    names = table.class_label_names.get(recipe.label_field)
    lines = []
    for row in table.rows:
        values = {f: row[f] for f in recipe.template_fields()}
        if any(v is None for v in values.values()):
            counts.dropped["a field of the input template is empty (null)"] += 1
            continue
        for old, new in recipe.replace.items():
            values = {f: str(v).replace(old, new) for f, v in values.items()}
        text = _clean_input(recipe.input_template.format_map(values))
        raw = row[recipe.label_field]
        named = names is not None and isinstance(raw, int) and 0 <= raw < len(names)
        shown = f"{raw!r}" + (f" ({names[raw]})" if named else "")
        if recipe.options_field:
            # MetaICL parses options out of the cleaned input, then strips input and options
            text = text.strip()
            row_options = [
                str(o).replace("\\n", " ").strip() for o in _nested_list(row, recipe.options_field)
            ]
            output = str(raw).strip()
            if recipe.option_keys_field:
                keys = [str(key) for key in _nested_list(row, recipe.option_keys_field)]
                if output in keys and len(keys) == len(row_options):
                    output = row_options[keys.index(output)]
            elif isinstance(raw, int) and 0 <= raw < len(row_options):
                output = row_options[raw]
            if output not in row_options or len(row_options) < 2:
                counts.dropped[f"answer {shown} not among the row's options"] += 1
                continue
            lines.append(
                {"task": recipe.task, "input": text, "output": output, "options": row_options}
            )
        else:
            output = _label_output(raw, recipe, names)
            if output is None:
                counts.dropped[f"label {shown} is not in the label map"] += 1
                continue
            if options is not None and output not in options:
                counts.dropped[f"label {shown} -> {output!r} is not among the options"] += 1
                continue
            lines.append(
                {
                    "task": recipe.task,
                    "input": text,
                    "output": output,
                    "options": list(options or []),
                }
            )
    counts.num_kept = len(lines)
    return lines, counts


def _resolve_config(recipe: TaskRecipe, train: Table, data_dir: Path) -> TaskConfig:
    if recipe.options_field:
        return TaskConfig(task_type="multi-choice", options=None)
    if recipe.options is not None:
        options = recipe.options
    else:
        try:
            config = load_task_config(recipe.task, data_dir)
        except DataError:
            config = None
        if config is not None and config.task_type != "classification":
            raise DataError(
                f"task {recipe.task!r} is {config.task_type} in its task config: give the "
                "field with each row's options (--options-field) or use another task name"
            )
        if config is not None:
            options = config.options or ()
        elif recipe.label_map is not None:
            options = tuple(sorted(set(recipe.label_map.values())))
        else:
            names = train.class_label_names.get(recipe.label_field)
            options = tuple(
                sorted({_label_output(r[recipe.label_field], recipe, names) for r in train.rows})
            )
    if len(options) < 2:
        raise DataError(
            f"task {recipe.task!r}: a classification task needs at least 2 options, got "
            f"{list(options)}; pass --options or a --label-map with 2 or more labels"
        )
    return TaskConfig(task_type="classification", options=tuple(options))


# ---------------------------------------------------------------------------------------------
# Sampling (MetaICL's rules; docs/data.md)


def hold_out_test(lines: list[Any]) -> tuple[list[Any], list[Any]]:
    """A source without a test split: shuffle with seed 42, the first 80% train, the rest test."""
    shuffled = list(lines)
    np.random.RandomState(HOLD_OUT_SEED).shuffle(shuffled)
    num_train = int(HOLD_OUT_TRAIN_FRACTION * len(shuffled))
    return shuffled[:num_train], shuffled[num_train:]


def sample_demonstrations(pool: Sequence[Any], k: int, seed: int) -> tuple[list[Any], list[Any]]:
    """The k demonstrations (`_train`) and k dev lines of one seed, as MetaICL draws them: the
    pool shuffled by numpy's legacy generator seeded with `seed`, then its first k and next k
    lines (no balancing over labels)."""
    shuffled = list(pool)
    np.random.RandomState(seed).shuffle(shuffled)
    return shuffled[:k], shuffled[k : 2 * k]


# ---------------------------------------------------------------------------------------------
# Writing


def task_config_file(out_dir: Path | str, task: str) -> Path:
    return Path(out_dir) / "config" / "tasks" / f"{task}.json"


@dataclass(frozen=True)
class ImportSummary:
    """What `import_task` kept, dropped and wrote."""

    task: str
    config: TaskConfig
    train: SplitCounts
    test: SplitCounts
    test_held_out: bool
    """True when the test set was held out of the training rows (no test source)."""
    num_pool: int
    """Lines the demonstrations (or the meta-training lines) are drawn from."""
    num_test: int
    """Test lines (0 for a meta-training task)."""
    k: int
    files: tuple[Path, ...]

    def describe(self) -> str:
        options = f", options {list(self.config.options)}" if self.config.options else ""
        lines = [
            f"{self.task}: {self.config.task_type}{options}",
            f"  train source: {self.train.describe()}",
        ]
        if not self.test_held_out:
            lines.append(f"  test source: {self.test.describe()}")
        held = " (held out: 20% of the rows, seed 42)" if self.test_held_out else ""
        if self.num_test:
            lines.append(
                f"  {self.num_pool} lines to draw demonstrations from, "
                f"{self.num_test} test lines{held}"
            )
        else:
            lines.append(f"  {min(self.k, self.num_pool)} meta-training lines (k={self.k}){held}")
        return "\n".join(lines)


def _jsonl(lines: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def import_task(
    train: Table,
    recipe: TaskRecipe,
    out_dir: Path | str,
    *,
    test: Table | None = None,
    k: int = 16,
    seeds: Sequence[int] = TEST_SEEDS,
    meta_train: bool = False,
) -> ImportSummary:
    """Write `out_dir/{task}/{task}_{k}_{seed}_{train,dev,test}.jsonl` for every seed and the
    task config `out_dir/config/tasks/{task}.json`.

    `test` None: the test set is held out of `train` (MetaICL's rule for such datasets).
    `meta_train`: a meta-training task (MetaICL: k=16384, seed 100): only `_train`, holding up
    to k lines. Raises DataError for an unknown field, too few rows, or an empty result.
    """
    check_task_name(recipe.task)
    out_dir = Path(out_dir)
    if k < 1 or not seeds:
        raise DataError(f"k must be >= 1 and at least one seed given (got k={k}, seeds={seeds})")
    _check_fields(recipe, train)
    if test is not None:
        _check_fields(recipe, test)
    config = _resolve_config(recipe, train, out_dir)
    train_lines, train_counts = _to_lines(train, recipe, config.options)
    if test is None:
        pool, test_lines = hold_out_test(train_lines)
        test_counts = SplitCounts()
    else:
        pool = train_lines
        test_lines, test_counts = _to_lines(test, recipe, config.options)
    if len(pool) < (1 if meta_train else k):
        raise DataError(
            f"task {recipe.task!r}: {len(pool)} rows to draw demonstrations from"
            f"{' (after holding out the test set)' if test is None else ''}, fewer than k={k} "
            f"({train_counts.describe()}); check the label field and map, or use a smaller k"
        )
    if not test_lines and not meta_train:
        raise DataError(
            f"task {recipe.task!r}: the test set is empty "
            f"({(test_counts if test is not None else train_counts).describe()})"
        )
    files = []
    test_text = _jsonl(test_lines)
    for seed in seeds:
        demos, dev = sample_demonstrations(pool, k, seed)
        for split, lines in zip(SPLITS, (demos, dev, None), strict=True):
            if meta_train and split != "train":
                continue
            path = task_file(out_dir, recipe.task, k, seed, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(write_atomic(path, test_text if lines is None else _jsonl(lines)))
    config_path = task_config_file(out_dir, recipe.task)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    options = None if config.options is None else list(config.options)
    config_json = {"task_type": config.task_type, "options": options}
    files.append(write_atomic(config_path, json.dumps(config_json) + "\n"))
    return ImportSummary(
        task=recipe.task,
        config=config,
        train=train_counts,
        test=test_counts,
        test_held_out=test is None,
        num_pool=len(pool),
        num_test=0 if meta_train else len(test_lines),
        k=k,
        files=tuple(files),
    )
