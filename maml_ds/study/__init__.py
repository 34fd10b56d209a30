"""`maml-ds study`: the paper's experiment grid planned, run through the existing commands,
and gathered into its tables. config (StudyConfig, presets, the recipe table) -> plan (the
steps) -> runner (subprocesses, state.json) -> report (numbers, findings, PNG). docs/study.md.
"""

from maml_ds.study.config import PRESETS, RECIPES, Recipe, StudyConfig, preset_config
from maml_ds.study.plan import PLAN_FILE, Plan, Step, build_plan, read_plan
from maml_ds.study.report import PNG_FILE, SUMMARY_FILE, StudySummary, gather, write_png
from maml_ds.study.runner import (
    STATE_FILE,
    StepFailed,
    StudyInterrupted,
    StudyState,
    command_line,
    run_steps,
    step_argv,
)

__all__ = [
    "PLAN_FILE",
    "PNG_FILE",
    "PRESETS",
    "RECIPES",
    "STATE_FILE",
    "SUMMARY_FILE",
    "Plan",
    "Recipe",
    "Step",
    "StepFailed",
    "StudyConfig",
    "StudyInterrupted",
    "StudyState",
    "StudySummary",
    "build_plan",
    "command_line",
    "gather",
    "preset_config",
    "read_plan",
    "run_steps",
    "step_argv",
    "write_png",
]
