"""The study's plan: every step as the `maml-ds` command it runs, its outputs and what it needs.

Building a plan writes nothing (`--dry-run` prints it); it only asks whether the starting model
is a path. Result file names follow `maml-ds eval` / `maml-ds adapt` (docs/evaluation.md,
"Outputs"). docs/study.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maml_ds.config import parse_method
from maml_ds.study.config import (
    ABLATION_ROWS,
    Recipe,
    StudyConfig,
    method_label,
    with_variant,
)

__all__ = ["PLAN_FILE", "PLAN_FORMAT", "Plan", "ResultRef", "Step", "build_plan", "read_plan"]

PLAN_FILE = "plan.json"
PLAN_FORMAT = "maml-ds-study-plan"
BASELINES = {"no-icl": "No ICL", "raw-lm": "Raw LM"}


@dataclass(frozen=True)
class ResultRef:
    """Where an evaluation's result file goes in the report."""

    path: str
    parts: tuple[str, ...]
    """The tables (parts) that show it."""
    setting: str
    scope: str
    variant: str
    label: str
    baseline: str
    """none | no-icl | raw-lm."""


@dataclass(frozen=True)
class Step:
    """One command of the study."""

    id: str
    kind: str
    """data | start | train | eval | adapt."""
    argv: tuple[str, ...]
    """The command, starting with "maml-ds" (the console script of this environment)."""
    outputs: tuple[str, ...]
    """Files that exist once the step has finished (its last writes)."""
    needs: tuple[str, ...] = ()
    """Steps whose outputs this one reads: a step that runs again invalidates its dependents."""
    run_dir: str | None = None
    """train: the run folder; a rerun adds `-- --resume` when it holds checkpoints."""
    result: ResultRef | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Step:
        result = raw.get("result")
        return Step(
            id=raw["id"],
            kind=raw["kind"],
            argv=tuple(raw["argv"]),
            outputs=tuple(raw["outputs"]),
            needs=tuple(raw["needs"]),
            run_dir=raw.get("run_dir"),
            result=None
            if result is None
            else ResultRef(**{**result, "parts": tuple(result["parts"])}),
        )


@dataclass
class Plan:
    config: StudyConfig
    out_dir: Path
    steps: list[Step] = field(default_factory=list)

    def step(self, step_id: str) -> Step:
        return next(s for s in self.steps if s.id == step_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "config": self.config.to_json(),
            "steps": [s.to_json() for s in self.steps],
        }


def read_plan(path: Path) -> Plan:
    """A plan.json back (ValueError if it is not one)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} is not a maml-ds study plan")
    cfg = dict(raw["config"])
    recipes = {m: Recipe(**r) for m, r in cfg.pop("recipes").items()}
    tuples = {k: tuple(v) for k, v in cfg.items() if isinstance(v, list)}
    config = StudyConfig(**{**cfg, **tuples, "recipes": recipes})
    return Plan(config, path.parent, [Step.from_json(s) for s in raw["steps"]])


class _Builder:
    def __init__(self, cfg: StudyConfig, out_dir: Path):
        self.cfg, self.out = cfg, out_dir
        self.plan = Plan(cfg, out_dir)
        self.seeds = ",".join(str(s) for s in cfg.eval_seeds)

    def add(self, step: Step) -> Step:
        self.plan.steps.append(step)
        return step

    # ------------------------------------------------------------------ inputs
    def data(self) -> tuple[str, tuple[str, ...]]:
        """The data folder and the step that writes it (none for a given folder)."""
        if self.cfg.data_dir is not None:
            return str(Path(self.cfg.data_dir).expanduser().resolve()), ()
        folder = self.out / "data"
        self.add(
            Step(
                "data",
                "data",
                ("maml-ds", "data", "synth", "--out", str(folder), "--seed",
                 str(self.cfg.synthetic_seed)),
                (str(folder / "synthetic_suite.json"),),
            )
        )  # fmt: skip
        return str(folder), ("data",)

    def starting_model(self, data: str, needs: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
        """The starting model, written once as a Hugging Face folder when it is a built-in
        random-init config: a run stopped before its first update, exported."""
        from maml_ds.models import builtin_arch

        name = self.cfg.starting_model
        if Path(name).expanduser().exists():
            return str(Path(name).expanduser().resolve()), ()
        if builtin_arch(name) is None:
            return name, ()  # a Hugging Face id
        if self.cfg.pretrain_steps:
            return self.pretrain(name, data, needs)
        run, model = self.out / "start" / "run", self.out / "start" / "model"
        self.add(
            Step(
                "start.init",
                "start",
                ("maml-ds", "train", "--model", name, "--data", data, "--setting",
                 self.cfg.settings[0], "--seed", str(self.cfg.train_seed), "--out", str(run),
                 "--max-steps", "1", "--stop-after", "0"),
                (str(run / "checkpoints" / "latest"),),
                needs,
            )
        )  # fmt: skip
        self.add(
            Step(
                "start.export",
                "start",
                ("maml-ds", "export", str(run), str(model)),
                (str(model / "maml_ds_export.json"),),
                ("start.init",),
            )
        )
        return str(model), ("start.export",)

    def launch_argv(self, method: str, run: Path) -> list[str]:
        cfg = self.cfg
        argv = ["maml-ds", "launch", "--method", method, "--preset", cfg.launch_preset,
                "--nodes", str(cfg.nodes), "--gpus", str(cfg.gpus), "--master-port",
                str(cfg.master_port), "--run-dir", str(run)]  # fmt: skip
        if cfg.hostfile is not None:
            argv += ["--hostfile", str(Path(cfg.hostfile).expanduser().resolve())]
        return argv

    def pretrain(self, name: str, data: str, needs: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
        """The starting model: the built-in copy-pre-trained (`maml-ds pretrain`'s recipe,
        through `launch --method copy`); its RUN/final is what every method starts from."""
        cfg = self.cfg
        run = self.out / "start" / "pretrain"
        argv = (*self.launch_argv("copy", run), "--", "--model", name, "--data", data,
                "--setting", cfg.settings[0], "--seed", str(cfg.train_seed), "--max-steps",
                str(cfg.pretrain_steps), "--lr", f"{cfg.pretrain_lr:g}", "--warmup-steps",
                str(min(100, cfg.pretrain_steps // 10)), "--micro-batch-size",
                str(cfg.pretrain_micro_batch_size), "--copy-offset-from",
                str(cfg.pretrain_steps * 5 // 7), "--save-every",
                str(max(1, cfg.pretrain_steps // 5)))  # fmt: skip
        self.add(
            Step("start.pretrain", "train", argv, (str(run / "final" / "maml_ds_export.json"),),
                 needs, run_dir=str(run))
        )  # fmt: skip
        return str(run / "final"), ("start.pretrain",)

    # ------------------------------------------------------------------ evaluations
    def eval_dir(self, setting: str, model_slug: str) -> Path:
        return self.out / "eval" / setting / model_slug

    def common_eval(self, data: str, setting: str, variant: str) -> tuple[str, ...]:
        cfg = self.cfg
        return ("--data", data, "--setting", setting, "--variant", variant, "--seeds",
                self.seeds, "--k", str(cfg.k), "--batch-size", str(cfg.eval_batch_size),
                "--format", cfg.prompt_format)  # fmt: skip

    def evaluate(
        self,
        step_id: str,
        model: str,
        out: Path,
        *,
        data: str,
        setting: str,
        variant: str,
        scope: str,
        label: str,
        baseline: str,
        parts: tuple[str, ...],
        needs: tuple[str, ...],
    ) -> None:
        name = f"eval_{setting}_{scope}_{variant}_{baseline}_k{self.cfg.k}.json"
        argv = ("maml-ds", "eval", "--model", model, *self.common_eval(data, setting, variant),
                "--out", str(out), "--label", label, *(("--unseen-only",) if scope == "unseen"
                else ()), *(("--baseline", baseline) if baseline != "none" else ()),
                *self.cfg.eval_options)  # fmt: skip
        path = str(out / name)
        ref = ResultRef(path, parts, setting, scope, variant, label, baseline)
        self.add(Step(step_id, "eval", argv, (path,), needs, result=ref))

    def baselines(self, start: str, data: str, needs: tuple[str, ...]) -> None:
        cfg = self.cfg
        shown: dict[str, list[str]] = {}
        for part in ("complete", "limited"):
            if part in cfg.parts:
                for setting in cfg.settings:
                    shown.setdefault(setting, []).append(part)
        if "ablation" in cfg.parts:
            shown.setdefault(cfg.ablation_setting, []).append("ablation")
        for setting, parts in shown.items():
            variants = cfg.variants if parts != ["ablation"] else ("direct",)
            for variant in variants:
                for baseline, base_label in BASELINES.items():
                    for scope in cfg.scopes:
                        self.evaluate(
                            f"baseline.{setting}.{variant}.{baseline}.{scope}",
                            start,
                            self.eval_dir(setting, "start"),
                            data=data, setting=setting, variant=variant, scope=scope,
                            label=with_variant(base_label, variant), baseline=baseline,
                            parts=tuple(parts), needs=needs,
                        )  # fmt: skip

    # ------------------------------------------------------------------ training
    def train(
        self,
        step_id: str,
        run: Path,
        *,
        method: str,
        start: str,
        data: str,
        setting: str,
        variant: str,
        train_fraction: float | None,
        extra: tuple[str, ...],
        needs: tuple[str, ...],
    ) -> Step:
        cfg = self.cfg
        recipe = cfg.recipes[method]
        launch = self.launch_argv(method, run)
        train = ["--data", data, "--setting", setting, "--model", start, "--variant", variant,
                 "--k", str(cfg.k), "--seed", str(cfg.train_seed), "--max-steps",
                 str(recipe.max_steps), "--lr", f"{recipe.lr:g}", "--schedule", recipe.schedule,
                 "--micro-batch-size", str(cfg.micro_batch_size), "--save-every",
                 str(cfg.save_every), "--format", cfg.prompt_format, "--tasks", cfg.tasks,
                 "--validate-every", str(recipe.validate_every)]  # fmt: skip
        if cfg.tasks == "fresh":
            train += ["--copy-share", f"{cfg.copy_share:g}"]
        if cfg.score_demonstrations:
            train += ["--score-demonstrations"]
        spec = parse_method(method)
        if spec.kind == "maml":
            assert recipe.inner_lr is not None, f"recipe of {method} has no inner_lr"
            train += ["--inner-lr", f"{recipe.inner_lr:g}"]
            if not spec.first_order:
                train += ["--second-order", cfg.second_order]
        if train_fraction is not None:
            train += ["--train-fraction", f"{train_fraction:g}"]
        argv = (*launch, "--", *train, *extra, *cfg.train_options)
        outputs = [str(run / "final" / "maml_ds_export.json")]
        if recipe.validate_every:
            outputs.append(str(run / "best" / "maml_ds_export.json"))
        step = Step(step_id, "train", argv, tuple(outputs), needs, run_dir=str(run))
        return self.add(step)

    def trained_model(self, run: Path, method: str) -> str:
        """What a training's evaluations score: its best-validating weights when it validated
        (RUN/best), else its last (the run folder: RUN/final)."""
        return str(run / "best") if self.cfg.recipes[method].validate_every else str(run)

    def methods(self, start: str, data: str, needs: tuple[str, ...]) -> None:
        cfg = self.cfg
        train_parts = [p for p in ("complete", "limited") if p in cfg.parts]
        if "adapt" in cfg.parts and "complete" not in train_parts:
            train_parts.insert(0, "complete")  # adapt starts from the complete-data models
        for part in train_parts:
            fraction = cfg.train_fraction if part == "limited" else None
            for setting in cfg.settings:
                for variant in cfg.variants:
                    for method in cfg.methods:
                        slug = method + ("-channel" if variant == "channel" else "")
                        key = f"{part}.{setting}.{slug}"
                        run = self.out / "runs" / f"{part}-{setting}-{slug}"
                        self.train(
                            f"train.{key}", run, method=method, start=start, data=data,
                            setting=setting, variant=variant, train_fraction=fraction,
                            extra=(), needs=needs,
                        )  # fmt: skip
                        label = method_label(method, variant)
                        out = self.eval_dir(setting, f"{part}-{slug}")
                        if part in cfg.parts:
                            for scope in cfg.scopes:
                                self.evaluate(
                                    f"eval.{key}.{scope}", self.trained_model(run, method),
                                    out, data=data,
                                    setting=setting, variant=variant, scope=scope,
                                    label=label, baseline="none", parts=(part,),
                                    needs=(f"train.{key}",),
                                )  # fmt: skip
                        if part == "complete" and "adapt" in cfg.parts:
                            self.adapt(
                                key, self.trained_model(run, method), out, data, setting,
                                variant, label,
                            )  # fmt: skip

    def adapt(
        self, key: str, model: str, out: Path, data: str, setting: str, variant: str, label: str
    ) -> None:
        cfg = self.cfg
        name = f"adapt_{setting}_{variant}_lr{cfg.adapt_lr:g}_steps{cfg.adapt_steps}_k{cfg.k}.json"
        argv = ("maml-ds", "adapt", "--model", model, *self.common_eval(data, setting, variant),
                "--lr", f"{cfg.adapt_lr:g}", "--steps", str(cfg.adapt_steps), "--out", str(out),
                "--label", f"{label} +adapt", *cfg.eval_options)  # fmt: skip
        path = str(out / name)
        ref = ResultRef(path, ("adapt",), setting, "unseen", variant, f"{label} +adapt", "none")
        self.add(Step(f"adapt.{key}", "adapt", argv, (path,), (f"train.{key}",), result=ref))

    def ablation(self, start: str, data: str, needs: tuple[str, ...]) -> None:
        cfg = self.cfg
        setting = cfg.ablation_setting
        for row in ABLATION_ROWS:
            slug = row.slug
            key = f"ablation.{setting}.{slug}"
            run = self.out / "runs" / f"ablation-{setting}-{slug}"
            self.train(
                f"train.{key}", run, method=row.method, start=start, data=data,
                setting=setting, variant="direct", train_fraction=cfg.train_fraction,
                extra=row.train_options, needs=needs,
            )  # fmt: skip
            for scope in cfg.scopes:
                self.evaluate(
                    f"eval.{key}.{scope}", self.trained_model(run, row.method),
                    self.eval_dir(setting, f"ablation-{slug}"),
                    data=data, setting=setting, variant="direct", scope=scope, label=row.label,
                    baseline="none", parts=("ablation",), needs=(f"train.{key}",),
                )  # fmt: skip


def build_plan(cfg: StudyConfig) -> Plan:
    """Every step of the study, in the order they run (baselines first, then per training its
    evaluations). `cfg` must be valid (`StudyConfig.validate`)."""
    builder = _Builder(cfg, Path(cfg.out_dir).expanduser().resolve())
    data, data_needs = builder.data()
    start, start_needs = builder.starting_model(data, data_needs)
    needs = (*data_needs, *start_needs)
    builder.baselines(start, data, needs)
    if {"complete", "limited", "adapt"} & set(cfg.parts):
        builder.methods(start, data, needs)
    if "ablation" in cfg.parts:
        builder.ablation(start, data, needs)
    return builder.plan
