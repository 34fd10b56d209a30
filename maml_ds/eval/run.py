"""Evaluation with the MetaICL protocol (docs/metaicl-protocol.md, docs/evaluation.md).

For every target task of a setting and every seed: the seed's k=16 demonstrations
(`{task}_16_{seed}_train.jsonl`) + each test example (`{task}_16_{seed}_test.jsonl`) + each of
its options form one prompt; the option whose scored tokens have the lowest MEAN per-token loss
is the prediction (ties: the first option). A task scores macro-F1 (classification) or accuracy;
a setting reports, over seeds, the average and the worst of the per-seed task means.

Scoring reuses the demonstration prefix: it is run through the model once per (task, seed) and
its key/value cache serves every test example and option, so only the target tokens are run per
prompt (`score_examples`). Left truncation at the whole-sequence cap cuts the prefix by an amount
that depends on the target's length; prompts are grouped by that cut and each distinct cut gets
its own cache, so every prompt sees exactly the tokens of plain full-sequence scoring
(`use_kv_cache=False`, the reference that the tests compare against).

Results are cached per (task, seed) in content-addressed files (the key hashes the model's
weights, the tokenizer, the task's data files and every option that changes a number); a file
that is corrupt, partial or inconsistent with the data is recomputed, never scored 0.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from maml_ds.config import ConfigError
from maml_ds.data.prompts import (
    EncodedPrompt,
    PromptFormat,
    build_option_prompts,
    collate,
    encode_demonstrations,
    option_targets,
    scored_token_loss,
)
from maml_ds.data.reader import TEST_SEEDS, Example, load_target_examples, task_file
from maml_ds.data.tasks import DataError, Setting, TaskConfig, load_setting, load_task_config
from maml_ds.eval.metrics import SeedAggregate, aggregate_seeds, task_score

__all__ = [
    "EVAL_VERSION",
    "Baseline",
    "EvalOptions",
    "EvalResult",
    "ScoringStats",
    "TaskSeedResult",
    "argmin_first",
    "evaluate",
    "load_cached",
    "model_fingerprint",
    "option_targets",
    "score_examples",
    "target_tasks",
    "tokenizer_fingerprint",
]

logger = logging.getLogger(__name__)

EVAL_VERSION = 1
"""Part of every cache key: bump it when a change of this module changes any number."""

RESULT_FORMAT = "maml-ds-eval"
Baseline = Literal["none", "no-icl", "raw-lm"]
BASELINES: tuple[str, ...] = get_args(Baseline)
Method = Literal["direct", "channel"]
FormatChoice = Literal["auto", "newlines", "spaces"]


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation runs. Everything but `seeds`, `batch_size` and `use_kv_cache` changes
    the numbers of a (task, seed) and is part of its cache key."""

    method: Method = "direct"
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
        if self.method not in get_args(Method):
            out.append(f"--method must be direct or channel, got {self.method!r}")
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
            method=self.method,
            newlines=self.newlines,
            max_length_per_example=self.max_length_per_example,
            max_length=self.max_length,
        )
        return fmt.for_k(self.k) if self.use_demonstrations else fmt

    def key(self) -> dict[str, Any]:
        """The options that change the numbers of one (task, seed)."""
        fmt = self.prompt_format()
        return {
            "method": self.method,
            "newlines": fmt.newlines,
            "use_demonstrations": self.use_demonstrations,
            "k": self.k,
            "max_length_per_example": fmt.max_length_per_example,
            "max_length": fmt.max_length,
        }

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
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


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class ScoringStats:
    """What a scoring call ran through the model (for the speed benchmark and the JSON)."""

    num_sequences: int = 0
    """Option prompts scored."""
    num_forward_tokens: int = 0
    """Positions run through the model, padding included (prefix passes included)."""
    num_real_tokens: int = 0
    """Positions run through the model, padding excluded."""
    num_prefix_passes: int = 0
    """Demonstration prefixes encoded (one per (task, seed) and distinct truncation cut)."""
    seconds: float = 0.0

    def add(self, other: ScoringStats) -> None:
        for name in (
            "num_sequences",
            "num_forward_tokens",
            "num_real_tokens",
            "num_prefix_passes",
            "seconds",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def argmin_first(losses: Sequence[float]) -> int:
    """Index of the lowest loss; ties go to the first option (MetaICL)."""
    if not losses:
        raise ValueError("no option losses")
    return min(range(len(losses)), key=losses.__getitem__)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """The name of the KV-cache argument (`cache` in transformers >= 5, `past_key_values`
    before) and whether `logits_to_keep` exists."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [1, heads, P, head_dim], from a DynamicCache."""
    if hasattr(cache, "layers"):  # transformers >= 5
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # transformers 4.x DynamicCache
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # legacy tuples


def _expanded_cache(prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Any:
    """A fresh DynamicCache holding the prefix for `batch` rows (the forward pass appends to it,
    so every suffix batch needs its own)."""
    from transformers import DynamicCache

    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix_kv]
    return DynamicCache(data)


def _mean_scored_ce(
    pred_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the masked positions of each row: [B].

    pred_logits [B, S, V] predict targets [B, S]; mask [B, S] bool. Half precision is upcast
    as in maml_ds.losses.
    """
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    logits = pred_logits[mask]  # [N, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    token_loss = F.cross_entropy(logits, targets[mask], reduction="none")  # [N]
    loss_sum = torch.zeros(mask.shape[0], dtype=token_loss.dtype, device=logits.device)
    loss_sum = loss_sum.index_add(0, rows, token_loss)
    return loss_sum / mask.sum(dim=1).clamp(min=1).to(loss_sum.dtype)


def _score_full(
    model: torch.nn.Module,
    prompts: Sequence[EncodedPrompt],
    *,
    pad_token_id: int,
    batch_size: int,
    stats: ScoringStats,
) -> list[float]:
    """Plain scoring: every prompt run in full, right-padded batches (longest first)."""
    device = _device(model)
    losses = [math.nan] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([prompts[i] for i in rows], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, loss in zip(rows, scored_token_loss(logits, batch).tolist(), strict=True):
            losses[row] = loss
        stats.num_forward_tokens += batch["input_ids"].numel()
        stats.num_real_tokens += int(batch["attention_mask"].sum())
    stats.num_sequences += len(prompts)
    return losses


def _score_after_prefix(
    model: torch.nn.Module,
    prefix: Sequence[int],
    targets: Sequence[tuple[list[int], list[bool]]],
    *,
    pad_token_id: int,
    batch_size: int,
    stats: ScoringStats,
) -> list[float]:
    """Score `prefix + target` for every target, running the prefix once.

    The prefix's KV cache is expanded to each suffix batch; position ids continue after the
    prefix; the attention mask covers prefix + suffix; suffixes are right-padded. The first
    target token is predicted by the prefix's last position.
    """
    device = _device(model)
    cache_kw, has_logits_to_keep = _forward_kwargs(model)
    prefix_ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)  # [1, P]
    extra = {"logits_to_keep": 1} if has_logits_to_keep else {}
    out = model(input_ids=prefix_ids, use_cache=True, **extra)
    last_logits = out.logits[:, -1:]  # [1, 1, V]
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    prefix_kv = [(k.detach(), v.detach()) for k, v in _cache_tensors(cache)]
    num_prefix = prefix_ids.shape[1]
    stats.num_prefix_passes += 1
    stats.num_forward_tokens += num_prefix
    stats.num_real_tokens += num_prefix

    losses = [math.nan] * len(targets)
    order = sorted(range(len(targets)), key=lambda i: -len(targets[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        size, length = len(rows), max(len(targets[i][0]) for i in rows)
        input_ids = torch.full((size, length), pad_token_id, dtype=torch.long)  # [B, S]
        real = torch.zeros((size, length), dtype=torch.bool)
        scored = torch.zeros((size, length), dtype=torch.bool)
        for r, i in enumerate(rows):
            ids, mask = targets[i]
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            real[r, : len(ids)] = True
            scored[r, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
        input_ids, real, scored = input_ids.to(device), real.to(device), scored.to(device)
        attention_mask = torch.cat(
            [torch.ones((size, num_prefix), dtype=torch.long, device=device), real.long()], dim=1
        )  # [B, P + S]
        position_ids = torch.arange(num_prefix, num_prefix + length, device=device)
        position_ids = position_ids.unsqueeze(0).expand(size, length)  # [B, S]
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kw: _expanded_cache(prefix_kv, size)},
        ).logits  # [B, S, V]
        # Token j of the suffix is predicted by suffix position j-1, token 0 by the prefix.
        pred = torch.cat([last_logits.expand(size, 1, -1), logits[:, :-1]], dim=1)  # [B, S, V]
        row_losses = _mean_scored_ce(pred, input_ids, scored & real)
        for i, loss in zip(rows, row_losses.tolist(), strict=True):
            losses[i] = loss
        stats.num_forward_tokens += input_ids.numel()
        stats.num_real_tokens += int(real.sum())
    stats.num_sequences += len(targets)
    return losses


@torch.inference_mode()
def score_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    demos: Sequence[Example],
    examples: Sequence[Example],
    fmt: PromptFormat,
    *,
    batch_size: int = 16,
    use_kv_cache: bool = True,
    stats: ScoringStats | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """The mean per-token loss of every option of every example: [example][option].

    `demos` empty = no demonstrations (cap `max_length_per_example`). With `use_kv_cache`, the
    demonstration prefix is encoded once per distinct left-truncation cut and its KV cache
    reused; otherwise every prompt of `build_option_prompts` is run in full. Both give the same
    losses up to float rounding (tests/unit/test_scoring.py). `on_batch(n)` reports progress in
    sequences.
    """
    stats = stats if stats is not None else ScoringStats()
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    has_demonstrations = len(demos) > 0
    # flat[j] = (example index, option index)
    flat: list[tuple[int, int]] = [
        (i, o) for i, ex in enumerate(examples) for o in range(len(ex.options))
    ]
    flat_losses: list[float] = [math.nan] * len(flat)
    try:
        if not use_kv_cache or not has_demonstrations:
            prompts: list[EncodedPrompt] = []
            for ex in examples:
                prompts += build_option_prompts(tokenizer, demos, ex, fmt)
            for start in range(0, len(prompts), batch_size * 8):  # chunks, for progress
                chunk = prompts[start : start + batch_size * 8]
                flat_losses[start : start + len(chunk)] = _score_full(
                    model, chunk, pad_token_id=pad_token_id, batch_size=batch_size, stats=stats
                )
                if on_batch:
                    on_batch(len(chunk))
        else:
            prefix = encode_demonstrations(tokenizer, demos, fmt)
            cap = fmt.total_cap(True)
            groups: dict[int, list[int]] = {}  # prefix cut -> indices into flat
            targets: list[tuple[list[int], list[bool]]] = []
            for ex in examples:
                for option, target in zip(
                    ex.options,
                    option_targets(tokenizer, ex, fmt, has_demonstrations=True),
                    strict=True,
                ):
                    ids, mask = target
                    if len(ids) > cap:
                        raise ValueError(
                            f"the target alone has {len(ids)} tokens, more than the cap {cap}"
                        )
                    cut = max(0, len(prefix) - (cap - len(ids)))  # as join_prompt cuts
                    kept = len(prefix) - cut
                    if not any(mask if kept else mask[1:]):
                        scored = "input" if fmt.method == "channel" else "option"
                        raise DataError(
                            f"task {ex.task!r}: the {scored} tokens of option {option!r} are "
                            f"empty or first in the sequence, so there is nothing to score "
                            f"(input={ex.input!r})"
                        )
                    groups.setdefault(cut, []).append(len(targets))
                    targets.append((ids, mask))
            # One cache alive at a time; the common case (nothing cut) is a single group.
            for cut in sorted(groups):
                members = groups[cut]
                group_targets = [targets[j] for j in members]
                if cut == len(prefix):  # the whole prefix is cut: plain scoring of the target
                    group_losses = _score_full(
                        model,
                        [EncodedPrompt(ids, mask) for ids, mask in group_targets],
                        pad_token_id=pad_token_id,
                        batch_size=batch_size,
                        stats=stats,
                    )
                else:
                    group_losses = _score_after_prefix(
                        model,
                        prefix[cut:],
                        group_targets,
                        pad_token_id=pad_token_id,
                        batch_size=batch_size,
                        stats=stats,
                    )
                for j, loss in zip(members, group_losses, strict=True):
                    flat_losses[j] = loss
                if on_batch:
                    on_batch(len(members))
    finally:
        model.train(was_training)
    stats.seconds += time.perf_counter() - started
    out: list[list[float]] = [[] for _ in examples]
    for (i, _), loss in zip(flat, flat_losses, strict=True):
        out[i].append(loss)
    return out


# --------------------------------------------------------------------------------------------
# Fingerprints and the per-(task, seed) cache
# --------------------------------------------------------------------------------------------


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


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


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


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
    """Extra facts from the `prepare` hook (e.g. adaptation losses)."""


def _predict(losses: Sequence[Sequence[float]], tests: Sequence[Example]) -> list[str]:
    return [ex.options[argmin_first(row)] for row, ex in zip(losses, tests, strict=True)]


def _score_of(
    predictions: Sequence[str], tests: Sequence[Example], task_config: TaskConfig
) -> tuple[str, float]:
    classification = task_config.is_classification
    golds = [ex.output for ex in tests]
    metric = "macro-f1" if classification else "accuracy"
    return metric, task_score(predictions, golds, classification=classification)


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
        predictions = _predict(checked, tests)
        if raw.get("predictions") != predictions:
            raise ValueError("stored predictions disagree with the stored losses")
        metric, score = _score_of(predictions, tests, task_config)
        info = raw.get("info", {})
        if not isinstance(info, dict):
            raise ValueError("'info' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring cache file %s (%s); recomputing", path, err)
        return None
    return TaskSeedResult(
        raw.get("task", tests[0].task),
        seed,
        metric,
        score,
        predictions,
        checked,
        cached=True,
        info=info,
    )


def _write_cache(path: Path, key: str, result: TaskSeedResult) -> None:
    """Atomic write: a crash leaves the old file or no file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "version": EVAL_VERSION,
        "key": key,
        "task": result.task,
        "seed": result.seed,
        "metric": result.metric,
        "score": result.score,
        "predictions": result.predictions,
        "losses": result.losses,
        "info": result.info,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# The evaluation loop and its result
# --------------------------------------------------------------------------------------------


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
        }

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


PrepareHook = Callable[[str, int], AbstractContextManager[dict[str, Any] | None]]


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sequences"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    fingerprint: str | None = None,
    tasks: Sequence[str] | None = None,
    prepare: PrepareHook | None = None,
    extra_key: Mapping[str, Any] | None = None,
    kind: Literal["eval", "adapt"] = "eval",
    show_progress: bool = True,
) -> EvalResult:
    """Evaluate `model` on the target tasks of `setting` for every seed of `options`.

    `cache_dir`: per-(task, seed) results are read from / written to it (None: no cache).
    `fingerprint`: the model's weights fingerprint (computed when None and a cache is used).
    `tasks`: override the task list (default: `target_tasks(setting)`).
    `prepare(task, seed)`: a context manager entered around the scoring of a (task, seed) that
    is not cached (adaptation uses it); what it yields is stored as the result's `info`.
    `extra_key`: more facts that change the numbers (e.g. adaptation options), hashed into
    every cache key.
    """
    data_dir = Path(data_dir)
    setting_obj = setting if isinstance(setting, Setting) else load_setting(setting, data_dir)
    task_list = (
        tuple(tasks)
        if tasks is not None
        else target_tasks(setting_obj, unseen_only=options.unseen_only)
    )
    overlap = tuple(t for t in task_list if t in set(setting_obj.train))
    if overlap:
        logger.warning(
            "setting %s: target task(s) %s are also meta-training tasks (kept as published)",
            setting_obj.name,
            ", ".join(overlap),
        )
    fmt = options.prompt_format()
    cache_path = Path(cache_dir) if cache_dir is not None else None
    if cache_path is not None and fingerprint is None:
        fingerprint = model_fingerprint(model)
    base_key = {
        "eval_version": EVAL_VERSION,
        "model": fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer) if cache_path is not None else None,
        "options": options.key(),
        "extra": dict(extra_key or {}),
    }

    # Load every (task, seed) first: data errors surface before any model time is spent.
    jobs = []
    for task in task_list:
        task_config = load_task_config(task, data_dir)
        for seed in options.seeds:
            demos, tests = load_target_examples(
                data_dir, task, seed=seed, k=options.k, task_config=task_config
            )
            jobs.append((task, seed, task_config, demos, tests))

    stats = ScoringStats()
    per_task: dict[str, dict[int, TaskSeedResult]] = {t: {} for t in task_list}
    total = sum(sum(len(ex.options) for ex in tests) for *_, tests in jobs)
    with _progress(show_progress and _is_rank0()) as progress:
        bar = progress.add_task(f"{kind} {setting_obj.name}", total=total)
        for task, seed, task_config, demos, tests in jobs:
            num_sequences = sum(len(ex.options) for ex in tests)
            key = path = None
            if cache_path is not None:
                data_key = {
                    "test": _file_sha256(task_file(data_dir, task, options.k, seed, "test")),
                    "task_config": asdict(task_config),
                }
                if options.use_demonstrations or extra_key:
                    data_key["train"] = _file_sha256(
                        task_file(data_dir, task, options.k, seed, "train")
                    )
                if extra_key:  # adaptation samples with the seed
                    data_key["seed"] = seed
                key = _sha256_json({**base_key, "data": data_key})
                path = cache_path / _safe_name(task) / f"{key[:32]}.json"
                cached = load_cached(path, key=key, tests=tests, task_config=task_config, seed=seed)
                if cached is not None:
                    cached.task, cached.seed = task, seed
                    per_task[task][seed] = cached
                    progress.advance(bar, num_sequences)
                    continue
            progress.update(bar, description=f"{kind} {task} seed {seed}")
            context = prepare(task, seed) if prepare is not None else nullcontext(None)
            with context as info:
                losses = score_examples(
                    model,
                    tokenizer,
                    demos if options.use_demonstrations else [],
                    tests,
                    fmt,
                    batch_size=options.batch_size,
                    use_kv_cache=options.use_kv_cache,
                    stats=stats,
                    on_batch=lambda n: progress.advance(bar, n),
                )
            predictions = _predict(losses, tests)
            metric, score = _score_of(predictions, tests, task_config)
            result = TaskSeedResult(
                task, seed, metric, score, predictions, losses, info=dict(info or {})
            )
            if path is not None and key is not None:
                _write_cache(path, key, result)
            per_task[task][seed] = result
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
        model_fingerprint=fingerprint or "",
        kind=kind,
        extra=dict(extra_key or {}),
        overlap=overlap,
        stats=stats,
    )


# --------------------------------------------------------------------------------------------
# Reading results back (compare) and labels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultSummary:
    """What `maml-ds compare` needs from a result file."""

    path: Path
    label: str
    column: str
    average: float
    worst: float
    seed_independent: bool
    """One seed, or no demonstrations: the tables print one number, not "avg/worst"."""


def read_result(path: Path | str) -> ResultSummary:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read a result file ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != RESULT_FORMAT:
        raise DataError(
            f"{path}: not a maml-ds result file (written by `maml-ds eval` or `maml-ds adapt`)"
        )
    try:
        return ResultSummary(
            path,
            str(raw["label"]),
            str(raw["column"]),
            float(raw["average"]),
            float(raw["worst"]),
            len(raw["seeds"]) == 1 or not raw["options"]["use_demonstrations"],
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: incomplete result file (missing {err})") from None


_METHOD_LABEL = re.compile(r"^(fo)?maml-(\d+)-(\d+)$")


def default_label(
    *, baseline: str, method: str, train_method: str | None, model_name: str, kind: str = "eval"
) -> str:
    """The paper's row names: No ICL, Raw LM, MetaICL, MAML-2-4 (FOMAML-2-4), with a
    "Channel " prefix for channel scoring and " +adapt" for adapted models."""
    if baseline == "no-icl":
        base = "No ICL"
    elif baseline == "raw-lm":
        base = "Raw LM"
    elif train_method == "metaicl":
        base = "MetaICL"
    elif train_method and _METHOD_LABEL.match(train_method):
        base = train_method.upper()
    else:
        base = Path(model_name.rstrip("/")).name or model_name
    label = f"Channel {base}" if method == "channel" else base
    return f"{label} +adapt" if kind == "adapt" else label


def paper_order(label: str) -> tuple[int, int, int, str]:
    """Sort key of a row: standard before channel, then No ICL, Raw LM, MetaICL, MAML-*,
    FOMAML-*, anything else; adapted after unadapted (the paper's tables)."""
    base = label.removeprefix("Channel ").removesuffix(" +adapt")
    rank = {"No ICL": 0, "Raw LM": 1, "MetaICL": 2}.get(base)
    if rank is None:
        rank = 3 if base.startswith("MAML-") else 4 if base.startswith("FOMAML-") else 5
    return (int(label.startswith("Channel ")), int(label.endswith(" +adapt")), rank, base)


def iter_result_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given; a folder contributes its `*.json` result files (not its cache)."""
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.glob("*.json") if q.is_file())
        else:
            yield p
