"""The validation curve: a setting's validation tasks scored during training (--validate-every).

Validation tasks are drawn like the test tasks but are other tasks (the synthetic suite writes
them; a setting JSON lists them under "validation"), so lr and steps can be chosen on them and
never on the test tasks. Every rank scores every task (the same forwards, so ZeRO-3's gathers
match); the score is MetaICL's task score (accuracy or macro-F1) with k demonstrations, averaged
over `VALIDATION_SEEDS`. The best point, update 0 (the starting weights) included, is
exported to RUN/best. docs/study.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maml_ds import distributed as D
from maml_ds.config import RunConfig
from maml_ds.data.prompts import PromptFormat
from maml_ds.data.reader import TEST_SEEDS, Example, load_target_examples
from maml_ds.data.tasks import DataError, load_setting, load_task_config
from maml_ds.eval.metrics import task_score
from maml_ds.eval.scoring import argmin_first, score_examples
from maml_ds.files import write_atomic

__all__ = [
    "BEST_DIR",
    "VALIDATION_FILE",
    "VALIDATION_SEEDS",
    "ValidationSet",
    "swap_in",
    "write_curve",
]

VALIDATION_SEEDS = TEST_SEEDS[:2]
"""Demonstration seeds of every validation task (the first two of MetaICL's five)."""
BEST_DIR = "best"
VALIDATION_FILE = "validation.json"
"""RUN/validation.json: the curve so far and the best update (rank 0 writes it)."""


@dataclass(frozen=True)
class _Task:
    name: str
    family: str | None
    classification: bool
    demonstrations: dict[int, list[Example]]
    test: list[Example]


def _families(data_dir: Path) -> dict[str, str]:
    """Task -> family for a synthetic suite's tasks; empty for other data."""
    from maml_ds.data.synth import MANIFEST_NAME, read_suite_summary

    if not (data_dir / MANIFEST_NAME).is_file():
        return {}
    return {name: info.family for name, info in read_suite_summary(data_dir).tasks.items()}


class ValidationSet:
    """The validation tasks of a run's setting, read once."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, fmt: PromptFormat):
        data_dir = Path(cfg.data.data_dir)
        setting = load_setting(cfg.data.setting, data_dir)
        if not setting.validation:
            raise DataError(
                f"setting {setting.name!r} lists no validation tasks, so --validate-every has "
                'nothing to score: add a "validation" list to its JSON (the synthetic suite '
                "writes one: maml-ds data synth) or pass --validate-every 0"
            )
        families = _families(data_dir)
        k = cfg.data.num_demonstrations
        self.tokenizer, self.fmt = tokenizer, fmt
        self.tasks: list[_Task] = []
        for name in setting.validation:
            task_type = load_task_config(name, data_dir).task_type
            demos, test = {}, None
            for seed in VALIDATION_SEEDS:
                d, test = load_target_examples(data_dir, name, seed=seed, k=k)
                demos[seed] = list(d)
            self.tasks.append(
                _Task(name, families.get(name), task_type == "classification", demos, list(test))
            )

    @torch.no_grad()
    def score(self, model: torch.nn.Module, batch_size: int = 32) -> dict[str, float]:
        """val_score (x100, mean over tasks of the mean over seeds) and val_<family>."""
        per_task: dict[str, float] = {}
        for task in self.tasks:
            seeds = []
            for demos in task.demonstrations.values():
                losses = score_examples(
                    model, self.tokenizer, demos, task.test, self.fmt, batch_size=batch_size
                )
                predicted = [
                    ex.options[argmin_first(lo)] for ex, lo in zip(task.test, losses, strict=True)
                ]
                golds = [ex.output for ex in task.test]
                seeds.append(task_score(predicted, golds, classification=task.classification))
            per_task[task.name] = sum(seeds) / len(seeds)
        out = {"val_score": 100 * sum(per_task.values()) / len(per_task)}
        families = sorted({t.family for t in self.tasks if t.family is not None})
        for family in families:
            scores = [per_task[t.name] for t in self.tasks if t.family == family]
            out[f"val_{family}"] = 100 * sum(scores) / len(scores)
        return out


def swap_in(staged: Path, final: Path) -> None:
    """Replace the folder `final` by `staged` (rank 0), never leaving neither in place."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    if old.exists():
        shutil.rmtree(old)


def write_curve(
    run_dir: Path, step: int, scores: dict[str, float], best_step: int, best_score: float | None
) -> None:
    """Add the point of update `step` to RUN/validation.json (rank 0), dropping later points a
    killed run had written (they are computed again, identically, after the resume)."""
    if not D.is_main():
        return
    path = run_dir / VALIDATION_FILE
    curve = []
    if path.is_file():
        try:
            curve = [p for p in json.loads(path.read_text())["curve"] if p["step"] < step]
        except (json.JSONDecodeError, KeyError, TypeError):
            curve = []
    curve.append({"step": step, **scores})
    record = {
        "seeds": list(VALIDATION_SEEDS),
        "best_step": best_step,
        "best_score": best_score,
        "curve": curve,
    }
    write_atomic(path, json.dumps(record, indent=2) + "\n")
