"""The evaluation loop: every target task of a setting at every seed, with the MetaICL protocol.

Each (task, seed) is scored with its seed's k demonstrations (`score_examples`), read from or
written to the result cache (`ResultCache`); a setting reports the average and the worst over
seeds of the per-seed task means. The protocol and the result file: docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from maml_ds.config import ConfigError
from maml_ds.data.prompts import PromptFormat
from maml_ds.data.reader import TEST_SEEDS, Example, load_target_examples
from maml_ds.data.tasks import DataError, Setting, TaskConfig, load_setting, load_task_config
from maml_ds.distributed import is_main, rank, world_size
from maml_ds.eval.cache import (
    EVAL_VERSION,
    CacheEntry,
    ResultCache,
    TaskSeedResult,
    load_cached,
    model_fingerprint,
    tokenizer_fingerprint,
    write_cache,
)
from maml_ds.eval.metrics import SeedAggregate, aggregate_seeds
from maml_ds.eval.progress import EvalProgress, ProgressOptions
from maml_ds.eval.results import RESULT_FORMAT
from maml_ds.eval.scoring import ScoringStats, score_examples
from maml_ds.eval.shard import assign_ranks, gather
from maml_ds.files import write_atomic

__all__ = [
    "Baseline",
    "EvalOptions",
    "EvalResult",
    "PrepareHook",
    "Variant",
    "evaluate",
    "target_tasks",
]

logger = logging.getLogger(__name__)

Baseline = Literal["none", "no-icl", "raw-lm"]
BASELINES: tuple[str, ...] = get_args(Baseline)
Variant = Literal["direct", "channel"]
FormatChoice = Literal["auto", "newlines", "spaces"]


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation runs. Everything but `seeds`, `batch_size` and `use_kv_cache` changes
    the numbers of a (task, seed) and is part of its cache key."""

    variant: Variant = "direct"
    """direct: score the option given the input; channel: score the input given the option."""
    baseline: Baseline = "none"
    """none: the model with its k demonstrations. no-icl: no demonstrations (the target alone,
    cap 256). raw-lm: demonstrations in the space format (MetaICL's original format, the Raw-LM
    baseline of a stock model)."""
    seeds: tuple[int, ...] = TEST_SEEDS
    """Demonstration seeds (MetaICL: 100, 13, 21, 42, 87)."""
    k: int = 16
    """Demonstrations per prompt: the k of the `{task}_{k}_{seed}_{split}.jsonl` files."""
    unseen_only: bool = False
    """Evaluate the setting's `unseen_domain_test` tasks only (paper Table 2) instead of `test`."""
    separators: FormatChoice = "auto"
    """newlines (MetaICL's current format, what maml-ds trains with) or spaces; auto: spaces
    for the stock-model baselines (no-icl, raw-lm), newlines otherwise."""
    max_length_per_example: int = 256
    max_length: int = 1024
    """Whole-sequence cap with demonstrations (MetaICL: min(256 k, 1024))."""
    batch_size: int = 16
    """Sequences per forward pass (option prompts, or target suffixes with the KV cache)."""
    use_kv_cache: bool = True
    """Reuse the demonstration prefix's key/value cache (same predictions, faster)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.variant not in get_args(Variant):
            out.append(f"--variant must be direct or channel, got {self.variant!r}")
        if self.baseline not in BASELINES:
            out.append(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.separators not in get_args(FormatChoice):
            out.append(f"--format must be auto, newlines or spaces, got {self.separators!r}")
        if not self.seeds:
            out.append("--seeds needs at least one seed, e.g. --seeds 100,13,21,42,87")
        elif len(set(self.seeds)) != len(self.seeds):
            out.append(f"--seeds lists a seed twice: {list(self.seeds)}")
        if self.k < 1:
            out.append(f"--k must be >= 1 (the k of the data files), got {self.k}")
        if self.batch_size < 1:
            out.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 2 < self.max_length_per_example <= self.max_length:
            out.append(
                "need 2 < max_length_per_example <= max_length, got "
                f"{self.max_length_per_example} and {self.max_length}"
            )
        return out

    @property
    def use_demonstrations(self) -> bool:
        return self.baseline != "no-icl"

    @property
    def newlines(self) -> bool:
        if self.separators == "auto":
            return self.baseline == "none"
        return self.separators == "newlines"

    @property
    def scope(self) -> str:
        return "unseen" if self.unseen_only else "all"

    def prompt_format(self) -> PromptFormat:
        fmt = PromptFormat(
            method=self.variant,
            newlines=self.newlines,
            max_length_per_example=self.max_length_per_example,
            max_length=self.max_length,
        )
        return fmt.for_k(self.k) if self.use_demonstrations else fmt

    def key(self) -> dict[str, Any]:
        """The options that change the numbers of one (task, seed). The variant is stored as
        "method", its name before the flag was renamed: the keys of existing caches hold."""
        fmt = self.prompt_format()
        return {
            "method": self.variant,
            "newlines": fmt.newlines,
            "use_demonstrations": self.use_demonstrations,
            "k": self.k,
            "max_length_per_example": fmt.max_length_per_example,
            "max_length": fmt.max_length,
        }

    def to_json(self) -> dict[str, Any]:
        """As in result files; the variant under "method", like `key`."""
        out = {"method" if name == "variant" else name: v for name, v in asdict(self).items()}
        out["seeds"] = list(self.seeds)
        out["use_demonstrations"] = self.use_demonstrations
        out["format"] = "newlines" if self.newlines else "spaces"
        return out


def target_tasks(setting: Setting, *, unseen_only: bool) -> tuple[str, ...]:
    """The tasks an evaluation scores: `unseen_domain_test` or `test`."""
    if not unseen_only:
        return setting.test
    if not setting.unseen_domain_test:
        raise DataError(
            f"setting {setting.name!r} has no 'unseen_domain_test' tasks; drop --unseen-only "
            "or add the list to the setting file"
        )
    return setting.unseen_domain_test


@dataclass
class EvalResult:
    """Every per-task, per-seed number of one evaluation, and the summary."""

    label: str
    """Row name in tables ("MetaICL", "Channel MAML-2-4", "Raw LM", ...)."""
    model: str
    setting: str
    options: EvalOptions
    tasks: tuple[str, ...]
    per_task: dict[str, dict[int, TaskSeedResult]]
    aggregate: SeedAggregate
    model_fingerprint: str = ""
    kind: Literal["eval", "adapt"] = "eval"
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific settings (e.g. the adaptation options)."""
    overlap: tuple[str, ...] = ()
    """Target tasks that are also meta-training tasks of the setting (MetaICL's `sick`)."""
    stats: ScoringStats = field(default_factory=ScoringStats)
    """Summed over ranks."""
    wall_seconds: float = 0.0
    """Wall time of `evaluate`, data loading to the gathered result."""

    @property
    def column(self) -> str:
        """The column of this result in the paper's tables: setting and task scope."""
        return f"{self.setting} ({self.options.scope})"

    def to_json(self) -> dict[str, Any]:
        per_task: dict[str, Any] = {}
        for task, by_seed in self.per_task.items():
            scores = [r.score for r in by_seed.values()]
            first = next(iter(by_seed.values()))
            per_task[task] = {
                "metric": first.metric,
                "num_examples": len(first.predictions),
                "average": sum(scores) / len(scores),
                "worst": min(scores),
                "seeds": {
                    str(seed): {
                        "score": r.score,
                        "predictions": r.predictions,
                        "cached": r.cached,
                        **({"info": r.info} if r.info else {}),
                    }
                    for seed, r in by_seed.items()
                },
            }
        agg = self.aggregate
        return {
            "format": RESULT_FORMAT,
            "version": EVAL_VERSION,
            "kind": self.kind,
            "label": self.label,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "setting": self.setting,
            "scope": self.options.scope,
            "column": self.column,
            "options": self.options.to_json(),
            "extra": self.extra,
            "tasks": list(self.tasks),
            "seeds": list(self.options.seeds),
            "overlap": list(self.overlap),
            "average": agg.average,
            "worst": agg.worst,
            "worst_task_mean": agg.worst_task_mean,
            "per_seed": {str(s): v for s, v in agg.per_seed.items()},
            "per_task": per_task,
            "scoring": asdict(self.stats),
            "wall_seconds": self.wall_seconds,
        }

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")


PrepareHook = Callable[[str, int], AbstractContextManager[dict[str, Any] | None]]


@dataclass
class _Pair:
    """One (task, seed) to score, its data loaded, and where its cache file lives."""

    task: str
    seed: int
    task_config: TaskConfig
    demos: list[Example]
    tests: list[Example]
    entry: CacheEntry | None

    @property
    def num_sequences(self) -> int:
        return sum(len(ex.options) for ex in self.tests)


def _work_units(pairs: Sequence[_Pair]) -> list[list[int]]:
    """Pairs that share a cache file (no-icl: the seeds of a task) form one unit, scored by one
    rank in order, so the first computes it and the others read it, as in one process."""
    units: dict[Any, list[int]] = {}
    for index, pair in enumerate(pairs):
        key = pair.entry.path if pair.entry is not None else index
        units.setdefault(key, []).append(index)
    return list(units.values())


def _my_pairs(pairs: Sequence[_Pair]) -> list[int]:
    """The indices of the pairs this rank scores, in order (every pair for one process)."""
    if world_size() == 1:
        return list(range(len(pairs)))
    units = _work_units(pairs)
    owner = assign_ranks([pairs[u[0]].num_sequences for u in units], world_size())
    return sorted(i for unit, r in zip(units, owner, strict=True) if r == rank() for i in unit)


def _merge_stats(parts: Sequence[ScoringStats]) -> ScoringStats:
    if len(parts) == 1:
        return parts[0]
    return ScoringStats(
        **{f.name: sum(getattr(p, f.name) for p in parts) for f in fields(parts[0])}
    )


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    data_dir: Path | str,
    setting: str | Setting,
    options: EvalOptions,
    label: str,
    model_name: str,
    cache_dir: Path | str | None = None,
    tasks: Sequence[str] | None = None,
    prepare: PrepareHook | None = None,
    extra_key: Mapping[str, Any] | None = None,
    kind: Literal["eval", "adapt"] = "eval",
    show_progress: bool = True,
    progress_options: ProgressOptions | None = None,
) -> EvalResult:
    """Evaluate `model` on the target tasks of `setting` for every seed of `options`.

    `cache_dir`: per-(task, seed) results are read from / written to it (None: no cache; the
    result then has no weights fingerprint).
    `tasks`: override the task list (default: `target_tasks(setting)`).
    `prepare(task, seed)`: a context manager entered around the scoring of a (task, seed) that
    is not cached (adaptation uses it); what it yields is stored as the result's `info`.
    `extra_key`: more facts that change the numbers (e.g. adaptation options), hashed into
    every cache key. `progress_options`: how often log lines come when stderr is no terminal.
    Under DeepSpeed's launcher the ranks share the pairs and every rank returns the whole
    result (`maml_ds.eval.shard`); only rank 0 shows progress.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    setting_obj = setting if isinstance(setting, Setting) else load_setting(setting, data_dir)
    task_list = (
        tuple(tasks)
        if tasks is not None
        else target_tasks(setting_obj, unseen_only=options.unseen_only)
    )
    shared = set(setting_obj.overlap())
    overlap = tuple(t for t in task_list if t in shared)
    if overlap and is_main():
        logger.warning(
            "setting %s: target task(s) %s are also meta-training tasks (kept as published)",
            setting_obj.name,
            ", ".join(overlap),
        )
    fmt = options.prompt_format()
    cache, fingerprint = None, ""  # no cache, no fingerprint: nothing to key
    if cache_dir is not None:
        fingerprint = model_fingerprint(model)
        cache = ResultCache(
            Path(cache_dir),
            model=fingerprint,
            tokenizer=tokenizer_fingerprint(tokenizer),
            options=options.key(),
            extra=dict(extra_key or {}),
        )

    # Load every (task, seed) first: data errors surface before any model time is spent.
    pairs: list[_Pair] = []
    for task in task_list:
        task_config = load_task_config(task, data_dir)
        for seed in options.seeds:
            demos, tests = load_target_examples(
                data_dir, task, seed=seed, k=options.k, task_config=task_config
            )
            entry = None
            if cache is not None:
                entry = cache.entry(
                    data_dir,
                    task,
                    seed,
                    k=options.k,
                    task_config=task_config,
                    use_demonstrations=options.use_demonstrations,
                )
            pairs.append(_Pair(task, seed, task_config, demos, tests, entry))

    mine = _my_pairs(pairs)
    stats = ScoringStats()
    results: dict[int, TaskSeedResult] = {}
    description = f"{kind} {setting_obj.name}"
    if world_size() > 1:
        description += f" (rank 0 of {world_size()})"
    progress = EvalProgress(
        description,
        num_pairs=len(mine),
        num_sequences=sum(pairs[i].num_sequences for i in mine),
        options=progress_options or ProgressOptions(),
        enabled=show_progress and is_main(),
    )
    with progress:
        for index in mine:
            pair = pairs[index]
            task, seed, task_config, tests = pair.task, pair.seed, pair.task_config, pair.tests
            if pair.entry is not None:
                cached = load_cached(
                    pair.entry.path,
                    key=pair.entry.key,
                    tests=tests,
                    task_config=task_config,
                    seed=seed,
                )
                if cached is not None:
                    cached.task, cached.seed = task, seed
                    results[index] = cached
                    progress.pair_done(cached_sequences=pair.num_sequences)
                    continue
            progress.describe(f"{kind} {task} seed {seed}")
            context = prepare(task, seed) if prepare is not None else nullcontext(None)
            with context as info:
                losses = score_examples(
                    model,
                    tokenizer,
                    pair.demos if options.use_demonstrations else [],
                    tests,
                    fmt,
                    batch_size=options.batch_size,
                    use_kv_cache=options.use_kv_cache,
                    stats=stats,
                    on_batch=progress.scored,
                )
            result = TaskSeedResult.from_losses(task, seed, losses, tests, task_config, info=info)
            if pair.entry is not None:
                write_cache(pair.entry, result)
            results[index] = result
            progress.pair_done()

    # Every rank gets every result (one process: its own); pairs back in task, seed order.
    gathered = gather((results, stats, fingerprint))
    if len({fp for *_, fp in gathered}) > 1:
        raise RuntimeError("the ranks evaluated different weights (model fingerprints differ)")
    results = {index: r for part, *_ in gathered for index, r in part.items()}
    stats = _merge_stats([s for _, s, _ in gathered])
    per_task: dict[str, dict[int, TaskSeedResult]] = {t: {} for t in task_list}
    for index, pair in enumerate(pairs):
        per_task[pair.task][pair.seed] = results[index]
    aggregate = aggregate_seeds(
        {t: {s: r.score for s, r in by_seed.items()} for t, by_seed in per_task.items()}
    )
    return EvalResult(
        label=label,
        model=model_name,
        setting=setting_obj.name,
        options=options,
        tasks=task_list,
        per_task=per_task,
        aggregate=aggregate,
        model_fingerprint=fingerprint,
        kind=kind,
        extra=dict(extra_key or {}),
        overlap=overlap,
        stats=stats,
        wall_seconds=time.perf_counter() - started,
    )
