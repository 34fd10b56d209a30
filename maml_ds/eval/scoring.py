"""Option scoring: the mean per-token loss of every option of every test example.

`score_examples` runs the demonstration prefix once per (task, seed) and distinct left-truncation
cut and reuses its key/value cache for every option, so every prompt sees exactly the tokens of
plain full-sequence scoring (`use_kv_cache=False`, the reference the tests compare against).
How and why: docs/evaluation.md ("Fast scoring").
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from maml_ds.data.prompts import (
    EncodedPrompt,
    PromptFormat,
    build_option_prompts,
    collate,
    encode_demonstrations,
    option_targets,
)
from maml_ds.data.reader import Example
from maml_ds.data.tasks import DataError
from maml_ds.losses import scored_token_loss

__all__ = ["ScoringStats", "argmin_first", "score_examples"]


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
        # Prepend the prefix's last token and logits: token 0 of the suffix is predicted by the
        # prefix, token j by suffix position j-1 (the next-token convention of maml_ds.losses).
        batch = {
            "input_ids": torch.cat([prefix_ids[:, -1:].expand(size, 1), input_ids], dim=1),
            "scored_mask": torch.cat([torch.zeros_like(scored[:, :1]), scored & real], dim=1),
        }  # [B, 1 + S]
        logits = torch.cat([last_logits.expand(size, 1, -1), logits], dim=1)  # [B, 1 + S, V]
        row_losses = scored_token_loss(logits, batch)
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
