"""Per-(task, seed) results on disk, content-addressed, and the fingerprints of their keys.

A key hashes the model's weights, the tokenizer, the task's data files and every option that
changes a number, so a file is reused only for the same computation. A file that is corrupt,
partial or inconsistent with the data is recomputed, never scored 0 (docs/evaluation.md,
"The cache never turns into a 0").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from maml_ds.data.reader import Example, task_file
from maml_ds.data.tasks import TaskConfig
from maml_ds.eval.metrics import task_score
from maml_ds.eval.results import safe_name
from maml_ds.eval.scoring import argmin_first
from maml_ds.files import write_atomic

__all__ = [
    "EVAL_VERSION",
    "CacheEntry",
    "ResultCache",
    "TaskSeedResult",
    "load_cached",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "write_cache",
]

logger = logging.getLogger(__name__)

EVAL_VERSION = 1
"""Part of every cache key: bump it when a change of the eval package changes any number."""


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every state-dict tensor (name, dtype, shape, bytes): same weights, same key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class TaskSeedResult:
    """One task at one seed."""

    task: str
    seed: int
    metric: Literal["macro-f1", "accuracy"]
    score: float
    """Macro-F1 or accuracy, a fraction in [0, 1]; always computed from `predictions`."""
    predictions: list[str]
    losses: list[list[float]]
    """Mean per-token loss of every option of every test example."""
    cached: bool = False
    """Read from the cache rather than computed in this run."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts from the `prepare` hook of `evaluate` (e.g. adaptation losses)."""

    @classmethod
    def from_losses(
        cls,
        task: str,
        seed: int,
        losses: list[list[float]],
        tests: Sequence[Example],
        task_config: TaskConfig,
        *,
        cached: bool = False,
        info: Mapping[str, Any] | None = None,
    ) -> TaskSeedResult:
        """Predictions (the argmin option of each example) and their score against the gold
        outputs: macro-F1 for classification tasks, accuracy otherwise."""
        predictions = [ex.options[argmin_first(row)] for row, ex in zip(losses, tests, strict=True)]
        classification = task_config.is_classification
        score = task_score(predictions, [ex.output for ex in tests], classification=classification)
        metric = "macro-f1" if classification else "accuracy"
        return cls(task, seed, metric, score, predictions, losses, cached, dict(info or {}))


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    key: str


@dataclass(frozen=True)
class ResultCache:
    """The cache folder of one model, tokenizer and option set (`root/{task}/{key}.json`)."""

    root: Path
    model: str
    """`model_fingerprint` of the weights."""
    tokenizer: str
    """`tokenizer_fingerprint`."""
    options: Mapping[str, Any]
    """`EvalOptions.key()`: the options that change the numbers."""
    extra: Mapping[str, Any]
    """More facts that change the numbers (the adaptation options); empty for `eval`."""

    def entry(
        self,
        data_dir: Path,
        task: str,
        seed: int,
        *,
        k: int,
        task_config: TaskConfig,
        use_demonstrations: bool,
    ) -> CacheEntry:
        """Where the result of (task, seed) lives and the key it must carry."""
        data_key: dict[str, Any] = {
            "test": _file_sha256(task_file(data_dir, task, k, seed, "test")),
            "task_config": asdict(task_config),
        }
        if use_demonstrations or self.extra:
            data_key["train"] = _file_sha256(task_file(data_dir, task, k, seed, "train"))
        if self.extra:  # adaptation samples with the seed
            data_key["seed"] = seed
        base = {
            "eval_version": EVAL_VERSION,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "options": dict(self.options),
            "extra": dict(self.extra),
        }
        key = _sha256_json({**base, "data": data_key})
        return CacheEntry(self.root / safe_name(task) / f"{key[:32]}.json", key)


def load_cached(
    path: Path, *, key: str, tests: Sequence[Example], task_config: TaskConfig, seed: int
) -> TaskSeedResult | None:
    """A cached (task, seed) result, or None when the file is missing, unreadable, partial or
    does not match the data: the caller recomputes it. Never trusts a stored score: the score is
    recomputed from the option losses (the predictions are their argmins and must match)."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("key") != key or raw.get("version") != EVAL_VERSION:
            raise ValueError("not a cache entry for this key")
        losses = raw["losses"]
        if not isinstance(losses, list) or len(losses) != len(tests):
            raise ValueError(f"{len(losses)} loss rows for {len(tests)} test examples")
        checked: list[list[float]] = []
        for row, ex in zip(losses, tests, strict=True):
            if not isinstance(row, list) or len(row) != len(ex.options):
                raise ValueError("a loss row does not match its example's options")
            values = [float(v) for v in row]
            if not all(math.isfinite(v) for v in values):
                raise ValueError("a loss is not finite")
            checked.append(values)
        info = raw.get("info", {})
        if not isinstance(info, dict):
            raise ValueError("'info' is not an object")
        task = raw.get("task", tests[0].task)
        result = TaskSeedResult.from_losses(
            task, seed, checked, tests, task_config, cached=True, info=info
        )
        if raw.get("predictions") != result.predictions:
            raise ValueError("stored predictions disagree with the stored losses")
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring cache file %s (%s); recomputing", path, err)
        return None
    return result


def write_cache(entry: CacheEntry, result: TaskSeedResult) -> None:
    """Atomic write: a crash leaves the old file or no file, never a partial one."""
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "version": EVAL_VERSION,
        "key": entry.key,
        "task": result.task,
        "seed": result.seed,
        "metric": result.metric,
        "score": result.score,
        "predictions": result.predictions,
        "losses": result.losses,
        "info": result.info,
    }
    write_atomic(entry.path, json.dumps(record))
