"""The study's results gathered from its result files: the paper's numbers with the seeds'
spread, win rates, the margin over Raw LM per task family, plain findings, and the PNG.

Reads the JSON `maml-ds eval` / `maml-ds adapt` write (nothing else; no model). Scores are
fractions as in the result files; tables and the PNG show them x100. docs/study.md.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maml_ds.eval.metrics import WinRate, win_rate
from maml_ds.eval.results import RESULT_FORMAT, paper_order
from maml_ds.study.config import is_synthetic_suite
from maml_ds.study.plan import Plan, ResultRef
from maml_ds.training.validation import VALIDATION_FILE

__all__ = [
    "SUMMARY_FILE",
    "PNG_FILE",
    "Margin",
    "ResultRow",
    "Spread",
    "StudySummary",
    "gather",
    "validation_curves",
    "write_png",
]

SUMMARY_FILE = "summary.json"
PNG_FILE = "study.png"
SUMMARY_FORMAT = "maml-ds-study-summary"
PART_TITLES = {
    "complete": "complete data (Tables 2/3)",
    "limited": "limited data (Tables 2/3, --train-fraction)",
    "adapt": "very few-shot adaptation (Table 4)",
    "ablation": "optimizer ablation (Table 5)",
}
OVERALL = "overall"
"""The margin over every setting's mean (not a family)."""


@dataclass(frozen=True)
class Spread:
    """One number per seed and its summary: average/worst (the paper's), std, min, max."""

    per_seed: dict[int, float]
    average: float
    worst: float
    std: float
    """Sample standard deviation over seeds (0 for one seed)."""
    max: float

    @property
    def min(self) -> float:
        return self.worst

    @staticmethod
    def of(per_seed: dict[int, float]) -> Spread:
        values = list(per_seed.values())
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return Spread(per_seed, statistics.fmean(values), min(values), std, max(values))

    def to_json(self) -> dict[str, Any]:
        return {
            "average": self.average,
            "worst": self.worst,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "per_seed": {str(s): v for s, v in self.per_seed.items()},
        }


@dataclass(frozen=True)
class ResultRow:
    """One result file in one table (part)."""

    part: str
    column: str
    """"setting (scope)", the paper's column."""
    ref: ResultRef
    spread: Spread
    seed_independent: bool
    """No demonstrations (No ICL) or one seed: tables print one number."""
    per_task: dict[str, dict[int, float]]
    """task -> seed -> score."""


@dataclass(frozen=True)
class Margin:
    """A method minus Raw LM (same variant), per seed, over one family's tasks (or overall)."""

    part: str
    label: str
    family: str
    spread: Spread


@dataclass
class StudySummary:
    rows: list[ResultRow] = field(default_factory=list)
    win_rates: dict[str, dict[str, dict[str, WinRate]]] = field(default_factory=dict)
    margins: list[Margin] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Planned result files that are not there (a study not finished)."""

    def parts(self) -> list[str]:
        return list(dict.fromkeys(r.part for r in self.rows))

    def to_json(self, plan: Plan) -> dict[str, Any]:
        return {
            "format": SUMMARY_FORMAT,
            "study": str(plan.out_dir),
            "seeds": list(plan.config.eval_seeds),
            "scores": "fractions (tables: x100); std: sample standard deviation over seeds",
            "results": [
                {"part": r.part, "column": r.column, **asdict(r.ref), **r.spread.to_json()}
                for r in self.rows
            ],
            "win_rates": {
                part: {
                    a: {
                        b: {"wins": w.wins, "settings": w.num_settings, "rate": _nan(w.rate)}
                        for b, w in row.items()
                    }
                    for a, row in table.items()
                }
                for part, table in self.win_rates.items()
            },  # fmt: skip
            "margins_over_raw_lm": [
                {"part": m.part, "label": m.label, "family": m.family, **m.spread.to_json()}
                for m in self.margins
            ],
            "findings": self.findings,
            "missing": self.missing,
        }


def _nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def _read(ref: ResultRef) -> dict[str, Any]:
    raw = json.loads(Path(ref.path).read_text(encoding="utf-8"))
    if raw.get("format") != RESULT_FORMAT:
        raise ValueError(f"{ref.path} is not a maml-ds result file")
    return raw


def _family(task: str, setting: str, synthetic: bool) -> str:
    """Synthetic suite: the task name's prefix before "_"; real data: the setting."""
    return task.split("_")[0] if synthetic else setting


def gather(plan: Plan) -> StudySummary:
    """Every finished evaluation of the plan, in the paper's row order per part."""
    summary = StudySummary()
    rows: list[ResultRow] = []
    for step in plan.steps:
        ref = step.result
        if ref is None:
            continue
        if not Path(ref.path).is_file():
            summary.missing.append(ref.path)
            continue
        raw = _read(ref)
        per_seed = {int(s): float(v) for s, v in raw["per_seed"].items()}
        per_task = {
            task: {int(s): float(r["score"]) for s, r in entry["seeds"].items()}
            for task, entry in raw["per_task"].items()
        }
        single = len(raw["seeds"]) == 1 or not raw["options"]["use_demonstrations"]
        for part in ref.parts:
            rows.append(ResultRow(part, raw["column"], ref, Spread.of(per_seed), single, per_task))
    part_order = list(PART_TITLES)
    rows.sort(key=lambda r: (part_order.index(r.part), paper_order(r.ref.label)))
    summary.rows = rows
    synthetic = is_synthetic_suite(str(_data_folder(plan)))
    for part in summary.parts():
        in_part = [r for r in rows if r.part == part]
        summary.win_rates[part] = _win_rates(in_part)
        summary.margins += _margins(part, in_part, synthetic)
    summary.families = list(dict.fromkeys(m.family for m in summary.margins if m.family != OVERALL))
    summary.findings = _findings(summary) + _over_no_icl(summary) + _no_icl_check(plan, rows)
    summary.findings += _selected_updates(plan)
    return summary


def _selected_updates(plan: Plan) -> list[str]:
    """Which update each validated training's evaluated weights (RUN/best) come from."""
    chosen = []
    for run, best, last in _validation_choices(plan):
        where = "the starting weights" if best == 0 else f"update {best}"
        chosen.append(f"{run} {where} of {last}")
    if not chosen:
        return []
    return [f"validation chose (RUN/best, what was evaluated): {'; '.join(chosen)}."]


def _validation_choices(plan: Plan) -> list[tuple[str, int, int]]:
    out = []
    for step in plan.steps:
        if step.run_dir is None:
            continue
        try:
            record = json.loads((Path(step.run_dir) / VALIDATION_FILE).read_text())
            out.append((Path(step.run_dir).name, record["best_step"], record["curve"][-1]["step"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, IndexError):
            continue
    return out


def _over_no_icl(summary: StudySummary) -> list[str]:
    """Each method's average minus No ICL's (same part, variant and columns): what the
    demonstrations buy after meta-training."""
    out = []
    for part in summary.parts():
        rows = [r for r in summary.rows if r.part == part]
        no_icl = {(r.ref.variant, r.column): r.spread.average for r in rows
                  if r.ref.baseline == "no-icl"}  # fmt: skip
        by_label: dict[str, list[float]] = {}
        for r in rows:
            key = (r.ref.variant, r.column)
            if r.ref.baseline != "no-icl" and key in no_icl:
                by_label.setdefault(r.ref.label, []).append(r.spread.average - no_icl[key])
        if by_label:
            name = PART_TITLES[part].split(" (")[0]
            margins = ", ".join(f"{label} {_points(statistics.fmean(v))}"
                                for label, v in by_label.items())  # fmt: skip
            out.append(f"{name}: over No ICL (points x100, mean over columns): {margins}.")
    return out


def _no_icl_check(plan: Plan, rows: list[ResultRow]) -> list[str]:
    """The suite's check: a test task whose No-ICL score is well above chance is answerable
    from its input alone (synthetic suite only)."""
    folder = _data_folder(plan)
    if not is_synthetic_suite(str(folder)):
        return []
    from maml_ds.data.synth import no_icl_problems
    from maml_ds.data.tasks import DataError

    scores: dict[str, float] = {}
    for r in rows:
        if r.ref.baseline == "no-icl":
            for task, by_seed in r.per_task.items():
                scores[task] = statistics.fmean(by_seed.values())
    try:
        problems = no_icl_problems(scores, folder)
    except (DataError, OSError) as err:
        return [f"suite check (No ICL near chance) not run: {err}"]
    return [f"suite check: {p}" for p in problems]


def _data_folder(plan: Plan) -> Path:
    """The study's data folder: --data, or the synthetic suite it wrote."""
    data = plan.config.data_dir
    return Path(data).expanduser() if data is not None else plan.out_dir / "data"


def _win_rates(rows: list[ResultRow]) -> dict[str, dict[str, WinRate]]:
    by_label: dict[str, dict[str, tuple[float, float]]] = {}
    for r in rows:
        by_label.setdefault(r.ref.label, {})[r.column] = (r.spread.average, r.spread.worst)
    return {
        a: {b: win_rate(by_label[a], by_label[b]) for b in by_label if b != a} for a in by_label
    }


def _margins(part: str, rows: list[ResultRow], synthetic: bool) -> list[Margin]:
    """Each method minus Raw LM of its variant, per seed; on the "all" scope where it ran."""
    raw_lm = {
        (r.ref.setting, r.ref.scope, r.ref.variant): r for r in rows if r.ref.baseline == "raw-lm"
    }
    out: list[Margin] = []
    methods = [r for r in rows if r.ref.baseline == "none"]
    for label in dict.fromkeys(r.ref.label for r in methods):
        pairs = []
        for setting in dict.fromkeys(r.ref.setting for r in methods if r.ref.label == label):
            mine = {
                r.ref.scope: r for r in methods if r.ref.label == label and r.ref.setting == setting
            }
            scope = "all" if "all" in mine else next(iter(mine))
            ref = raw_lm.get((setting, scope, mine[scope].ref.variant))
            if ref is not None:
                pairs.append((setting, mine[scope], ref))
        if not pairs:
            continue
        seeds = list(pairs[0][1].spread.per_seed)
        overall = {
            s: statistics.fmean(m.spread.per_seed[s] - r.spread.per_seed[s] for _, m, r in pairs)
            for s in seeds
        }
        out.append(Margin(part, label, OVERALL, Spread.of(overall)))
        by_family: dict[str, list[tuple[dict[int, float], dict[int, float]]]] = {}
        for setting, m, r in pairs:
            for task, scores in m.per_task.items():
                by_family.setdefault(_family(task, setting, synthetic), []).append(
                    (scores, r.per_task[task])
                )
        for family, tasks in by_family.items():
            per_seed = {s: statistics.fmean(a[s] - b[s] for a, b in tasks) for s in seeds}
            out.append(Margin(part, label, family, Spread.of(per_seed)))
    return out


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def _findings(summary: StudySummary) -> list[str]:
    """Plain sentences: who beats Raw LM (the starting model) and where nobody does."""
    out = []
    for part in summary.parts():
        margins = [m for m in summary.margins if m.part == part]
        overall = [m for m in margins if m.family == OVERALL]
        if not overall:
            continue
        name = PART_TITLES[part].split(" (")[0]
        winners = [m for m in overall if m.spread.average > 0]
        if not winners:
            best = max(overall, key=lambda m: m.spread.average)
            out.append(
                f"{name}: no meta-trained model beats Raw LM (its starting model); the best, "
                f"{best.label}, is {_points(best.spread.average)} points (x100) on average."
            )
        else:
            out += [
                f"{name}: {m.label} beats Raw LM by {_points(m.spread.average)} points (seeds: "
                f"std {100 * m.spread.std:.2f}, min {_points(m.spread.min)}, max "
                f"{_points(m.spread.max)})."
                for m in sorted(winners, key=lambda m: -m.spread.average)
            ]
        families = [m.family for m in margins if m.family != OVERALL]
        losing = [
            f for f in dict.fromkeys(families)
            if all(m.spread.average <= 0 for m in margins if m.family == f)
        ]  # fmt: skip
        if losing and len(set(families)) > 1:
            out.append(f"{name}: no method beats Raw LM on {', '.join(losing)}.")
    return out


def validation_curves(plan: Plan) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """run name -> `val_*` key -> (updates, values), from each training's RUN/validation.json
    (written by --validate-every; it holds update 0, the starting model, too)."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for step in plan.steps:
        if step.run_dir is None:
            continue
        path = Path(step.run_dir) / VALIDATION_FILE
        try:
            points = json.loads(path.read_text(encoding="utf-8"))["curve"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue  # not validated, or not yet
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for point in points:
            for key, value in point.items():
                if key.startswith("val_") and isinstance(value, int | float):
                    steps, values = curves.setdefault(key, ([], []))
                    steps.append(int(point["step"]))
                    values.append(float(value))
        if curves:
            out[Path(step.run_dir).name] = curves
    return out


def write_png(summary: StudySummary, plan: Plan, path: Path) -> Path:
    """Per part, the average per method and setting with the seeds' min..max as error bars;
    and the validation curves where the runs logged any. ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = summary.parts()
    curves = validation_curves(plan)
    num_axes = len(parts) + (1 if curves else 0)
    fig, axes = plt.subplots(num_axes, 1, figsize=(10, 4 * max(1, num_axes)), squeeze=False)
    for ax, part in zip(axes[:, 0], parts, strict=False):
        rows = [r for r in summary.rows if r.part == part]
        columns = list(dict.fromkeys(r.column for r in rows))
        labels = list(dict.fromkeys(r.ref.label for r in rows))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs, heights, low, high = [], [], [], []
            for j, column in enumerate(columns):
                row = next((r for r in rows if r.ref.label == label and r.column == column), None)
                if row is None:
                    continue
                s = row.spread
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                heights.append(100 * s.average)
                low.append(100 * (s.average - s.min))
                high.append(100 * (s.max - s.average))
            ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=label)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_ylabel("score x100")
        ax.set_title(f"{PART_TITLES[part]}: average, error bars = min..max over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncol=min(4, len(labels)))
    if curves:
        ax = axes[-1, 0]
        for run, by_key in curves.items():
            if "val_score" in by_key:
                steps, values = by_key["val_score"]
                ax.plot(steps, values, marker="o", label=run)
        ax.set_xlabel("update")
        ax.set_ylabel("validation score x100")
        ax.set_title("validation curves (RUN/validation.json; update 0 = the starting model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
