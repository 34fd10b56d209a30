"""Very few-shot adaptation (paper sec. 5.4), then the MetaICL evaluation.

For each unseen-domain target task and seed, the seed's 16 train examples are the adaptation
points: one AdamW step per point (its demonstrations drawn from the other points), evaluation
at that seed, then the original weights are restored, so every (task, seed) starts from the
meta-trained model. Plain PyTorch in one process, no DeepSpeed. The rules and their reasons:
docs/evaluation.md ("Very few-shot adaptation").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maml_ds.config import ConfigError
from maml_ds.data.prompts import (
    PromptFormat,
    build_training_prompt,
    collate,
    encode_demonstrations,
    encode_target,
    has_no_label,
)
from maml_ds.data.reader import Example, load_examples
from maml_ds.data.tasks import DataError, Setting, load_setting
from maml_ds.eval.progress import ProgressOptions
from maml_ds.eval.results import safe_name
from maml_ds.eval.run import EvalOptions, EvalResult, evaluate, target_tasks
from maml_ds.losses import mean_scored_loss

__all__ = [
    "AdaptOptions",
    "AdaptPrompt",
    "AdaptStats",
    "adapt_model",
    "adaptation_prompts",
    "run_adaptation",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptOptions:
    """How a model adapts to one (task, seed) (paper 5.4)."""

    lr: float = 1e-7
    """AdamW learning rate (paper: 1e-7)."""
    steps: int = 16
    """Optimizer steps, one target per step; 16 = one pass over the 16 points (paper)."""
    max_demonstrations: int = 16
    """Demonstrations per adaptation prompt, at most (paper: 16 or 256 tokens, the lower)."""
    max_prompt_tokens: int = 256
    """Token cap of a whole adaptation prompt; demonstrations are added while it holds."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    """Sampling seed (combined with the data seed) of target order and demonstrations."""

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if self.max_demonstrations < 0:
            problems.append(f"max_demonstrations must be >= 0, got {self.max_demonstrations}")
        if self.max_prompt_tokens < 8:
            problems.append(f"max_prompt_tokens must be >= 8, got {self.max_prompt_tokens}")
        if problems:
            raise ConfigError(problems)

    def key(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass(frozen=True)
class AdaptPrompt:
    """One adaptation step: the target and its demonstrations, as indices into the points."""

    target_index: int
    demo_indices: tuple[int, ...]


@dataclass
class AdaptStats:
    num_steps: int
    losses: list[float]
    """Training loss of each step (before the step)."""
    num_demonstrations: list[int]


def _prompt_length(
    tokenizer: Any, demos: Sequence[Example], target: Example, fmt: PromptFormat
) -> int:
    prefix = encode_demonstrations(tokenizer, demos, fmt)
    ids, _ = encode_target(
        tokenizer,
        target.input,
        target.output,
        fmt,
        has_demonstrations=bool(demos),
        no_label=has_no_label(target.options),
    )
    return len(prefix) + len(ids)


def adaptation_prompts(
    tokenizer: Any,
    points: Sequence[Example],
    fmt: PromptFormat,
    options: AdaptOptions,
    *,
    seed: int,
) -> list[AdaptPrompt]:
    """`options.steps` prompts: targets in a seeded random order (one pass, then another...),
    each with demonstrations drawn in a seeded random order from the OTHER points, added while
    the prompt stays within `max_prompt_tokens` and `max_demonstrations`."""
    if len(points) < 2:
        raise DataError(
            f"adaptation needs at least 2 points (a target + 1 other), got {len(points)}"
        )
    rng = np.random.default_rng([options.seed, seed, 5])
    targets: list[int] = []
    while len(targets) < options.steps:
        targets += [int(i) for i in rng.permutation(len(points))]
    prompts = []
    for target in targets[: options.steps]:
        others = [int(i) for i in rng.permutation(len(points)) if int(i) != target]
        chosen: list[int] = []
        for index in others:
            if len(chosen) >= options.max_demonstrations:
                break
            demos = [points[i] for i in [*chosen, index]]
            if _prompt_length(tokenizer, demos, points[target], fmt) > options.max_prompt_tokens:
                break  # "16 demonstrations or 256 tokens, whichever is lower"
            chosen.append(index)
        prompts.append(AdaptPrompt(target, tuple(chosen)))
    return prompts


def _training_format(fmt: PromptFormat, options: AdaptOptions) -> PromptFormat:
    """The evaluation format with the adaptation cap (no truncation happens: prompts are built
    to fit; a lone target longer than the cap is capped per example as usual)."""
    cap = max(options.max_prompt_tokens, fmt.max_length_per_example)
    return PromptFormat(
        method=fmt.method,
        newlines=fmt.newlines,
        max_length_per_example=fmt.max_length_per_example,
        max_length=cap,
    )


def adapt_model(
    model: torch.nn.Module,
    tokenizer: Any,
    points: Sequence[Example],
    fmt: PromptFormat,
    options: AdaptOptions,
    *,
    seed: int,
) -> AdaptStats:
    """Fine-tune `model` in place: one AdamW step per adaptation prompt (loss: the mean
    cross-entropy of the target's output tokens, direct, or input tokens, channel)."""
    prompts = adaptation_prompts(tokenizer, points, fmt, options, seed=seed)
    train_fmt = _training_format(fmt, options)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=options.lr,
        betas=options.betas,
        eps=options.eps,
        weight_decay=options.weight_decay,
    )
    was_training = model.training
    model.eval()  # no dropout: deterministic (docs/evaluation.md)
    losses: list[float] = []
    try:
        for prompt in prompts:
            demos = [points[i] for i in prompt.demo_indices]
            target = points[prompt.target_index]
            encoded = build_training_prompt(tokenizer, demos, target, train_fmt)
            batch = {k: v.to(device) for k, v in collate([encoded], pad).items()}
            with torch.enable_grad():
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                loss = mean_scored_loss(logits, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite adaptation loss {float(loss)}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return AdaptStats(len(prompts), losses, [len(p.demo_indices) for p in prompts])


@contextmanager
def adapted(
    model: torch.nn.Module,
    tokenizer: Any,
    points: Sequence[Example],
    fmt: PromptFormat,
    options: AdaptOptions,
    *,
    seed: int,
    keep_dir: Path | None = None,
) -> Iterator[dict[str, Any]]:
    """Adapt `model` for the body of the `with`, then restore its original weights."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        stats = adapt_model(model, tokenizer, points, fmt, options, seed=seed)
        delta = max(
            float((v - original[k]).abs().max())
            for k, v in model.state_dict().items()
            if v.is_floating_point()
        )
        info = {
            "adapt_steps": stats.num_steps,
            "adapt_losses": stats.losses,
            "adapt_num_demonstrations": stats.num_demonstrations,
            "adapt_max_weight_change": delta,
        }
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(keep_dir)
            tokenizer.save_pretrained(keep_dir)
            info["kept"] = str(keep_dir)
        yield info
    finally:
        with torch.no_grad():
            model.load_state_dict(original)


def run_adaptation(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    data_dir: Path | str,
    setting: str | Setting,
    eval_options: EvalOptions,
    adapt_options: AdaptOptions,
    label: str,
    model_name: str,
    cache_dir: Path | None = None,
    keep_dir: Path | None = None,
    show_progress: bool = True,
    progress_options: ProgressOptions | None = None,
) -> EvalResult:
    """Adapt to and evaluate every unseen-domain target task at every seed (paper 5.4).

    The adaptation points of (task, seed) are the seed's `{task}_{k}_{seed}_train.jsonl`.
    `keep_dir`: adapted weights are saved to `keep_dir/{task}/seed{seed}/` (not kept otherwise).
    """
    data_dir = Path(data_dir)
    setting_obj = setting if isinstance(setting, Setting) else load_setting(setting, data_dir)
    tasks = target_tasks(setting_obj, unseen_only=True)
    eval_options = replace(eval_options, unseen_only=True)  # the paper adapts to unseen domains
    fmt = eval_options.prompt_format()

    def prepare(task: str, seed: int):
        points = load_examples(
            data_dir, task, k=eval_options.k, seed=seed, split="train", min_examples=2
        )
        keep = keep_dir / safe_name(task) / f"seed{seed}" if keep_dir is not None else None
        return adapted(model, tokenizer, points, fmt, adapt_options, seed=seed, keep_dir=keep)

    return evaluate(
        model,
        tokenizer,
        data_dir=data_dir,
        setting=setting_obj,
        options=eval_options,
        label=label,
        model_name=model_name,
        cache_dir=cache_dir if keep_dir is None else None,
        tasks=tasks,
        prepare=prepare,
        extra_key={"adapt": adapt_options.key()},
        kind="adapt",
        show_progress=show_progress,
        progress_options=progress_options,
    )
