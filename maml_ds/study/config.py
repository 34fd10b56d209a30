"""StudyConfig: what one `maml-ds study` runs, its presets, and the recipe table.

`RECIPES` is the one table of training lengths and learning rates per preset and method; the
CPU numbers are placeholders until the recipe is measured (docs/study.md, "Defaults").
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from maml_ds.config import ConfigError, parse_method
from maml_ds.data.synth import MANIFEST_NAME
from maml_ds.data.synth import SETTINGS as SYNTHETIC_SETTINGS

__all__ = [
    "ABLATION_ROWS",
    "PAPER_SETTINGS",
    "PARTS",
    "PRESETS",
    "RECIPES",
    "AblationRow",
    "Part",
    "Recipe",
    "Scope",
    "StudyConfig",
    "Variant",
    "method_label",
    "with_variant",
    "preset_config",
    "SHIPPED_START",
]

Part = Literal["complete", "limited", "adapt", "ablation"]
Scope = Literal["all", "unseen"]
Variant = Literal["direct", "channel"]
PARTS: tuple[str, ...] = get_args(Part)

PAPER_SETTINGS = (
    "hr_to_lr",
    "class_to_class",
    "non_class_to_class",
    "qa_to_qa",
    "non_qa_to_qa",
    "non_nli_to_nli",
    "non_paraphrase_to_paraphrase",
)
"""The paper's seven meta-training settings (Table 1), MetaICL's names."""


@dataclass(frozen=True)
class Recipe:
    """How long and how fast one method trains."""

    max_steps: int
    """Optimizer updates (`maml-ds train --max-steps`: MetaICL steps or meta-updates)."""
    lr: float
    """`--lr`: MetaICL's learning rate, MAML's outer (meta) learning rate."""
    inner_lr: float | None = None
    """`--inner-lr` of MAML's support steps; None for MetaICL."""
    schedule: str = "linear"
    """`--schedule` (linear decay to 0, or constant)."""
    validate_every: int = 0
    """`--validate-every`: > 0 scores the validation tasks during training, and the study
    evaluates the best-validating weights (RUN/best) instead of the last (RUN/final)."""


_METAICL_PAPER = Recipe(50_000, 1e-5)
_MAML_PAPER = Recipe(50_000, 1e-5, 1e-5)

# cpu: measured on the validation tasks, never the test tasks (docs/icl-research.md, runs
# E1-E3): the same prompt budget for every method (9,600 prompts at a global batch of 16).
RECIPES: dict[str, dict[str, Recipe]] = {
    "cpu": {
        "metaicl": Recipe(600, 3e-4, schedule="constant", validate_every=100),
        "maml-2-1": Recipe(300, 3e-4, 3e-4, schedule="constant", validate_every=50),
        "maml-2-4": Recipe(75, 3e-4, 3e-4, schedule="constant", validate_every=15),
        "fomaml-2-1": Recipe(300, 3e-4, 3e-4, schedule="constant", validate_every=50),
    },
    "quick": {
        "metaicl": Recipe(4, 1e-4, validate_every=4),
        "maml-2-1": Recipe(2, 1e-4, 1e-4, validate_every=2),
        "maml-2-4": Recipe(1, 1e-4, 1e-4, validate_every=1),
        "fomaml-2-1": Recipe(2, 1e-4, 1e-4, validate_every=2),
    },
    "paper": {  # sec. 4.3: 50k steps, lr 1e-5, alpha = beta = 1e-5
        "metaicl": _METAICL_PAPER,
        "maml-2-1": _MAML_PAPER,
        "maml-2-4": _MAML_PAPER,
        "fomaml-2-1": _MAML_PAPER,
    },
}
"""preset -> method -> Recipe: the only place training lengths and learning rates are set."""


@dataclass(frozen=True)
class AblationRow:
    """One row of the optimizer ablation (paper Table 5)."""

    label: str
    slug: str
    """Its name in folder and step names."""
    method: str
    train_options: tuple[str, ...]


_UNSHARED = ("--no-shared-moments",)
ABLATION_ROWS = (
    AblationRow("MetaICL SGD", "metaicl-sgd", "metaicl", ("--outer-optimizer", "sgd", *_UNSHARED)),
    AblationRow("MetaICL AdamW", "metaicl-adamw", "metaicl", ()),
    AblationRow(
        "MAML-2-1 SGD+SGD",
        "maml-2-1-sgd-sgd",
        "maml-2-1",
        ("--inner-optimizer", "sgd", "--outer-optimizer", "sgd", *_UNSHARED),
    ),
    AblationRow(
        "MAML-2-1 SGD+AdamW",
        "maml-2-1-sgd-adamw",
        "maml-2-1",
        ("--inner-optimizer", "sgd", "--outer-optimizer", "adamw", *_UNSHARED),
    ),
    AblationRow(
        "MAML-2-1 AdamW+AdamW (d)",
        "maml-2-1-adamw-adamw-d",
        "maml-2-1",
        ("--inner-optimizer", "adamw", "--outer-optimizer", "adamw", *_UNSHARED),
    ),
    AblationRow(
        "MAML-2-1 AdamW+AdamW",
        "maml-2-1-adamw-adamw",
        "maml-2-1",
        ("--inner-optimizer", "adamw", "--outer-optimizer", "adamw", "--shared-moments"),
    ),
)
"""Table 5's rows (X+Y = inner+outer; (d): without shared moments). The paper's AdamW+SGD row
is marked identical to SGD+SGD there and is not run."""


SHIPPED_START = Path(__file__).resolve().parent.parent / "assets" / "copy-tiny-128"
"""The cpu study's starting model, made once by `maml-ds pretrain` (its command, seed and copy
loss: pretrain.json there): tiny-128 copy-pre-trained on the synthetic suite of seed 0, whose
word-level tokenizer it carries (docs/pretrain.md)."""


def is_synthetic_suite(data_dir: str) -> bool:
    return (Path(data_dir).expanduser() / MANIFEST_NAME).is_file()


def with_variant(label: str, variant: str) -> str:
    """The "Channel " prefix of channel models' rows (the paper's tables)."""
    return f"Channel {label}" if variant == "channel" else label


def method_label(method: str, variant: str) -> str:
    """The paper's row name: MetaICL, MAML-2-4, FOMAML-2-1 (Channel ...)."""
    return with_variant("MetaICL" if method == "metaicl" else method.upper(), variant)


@dataclass
class StudyConfig:
    """One study: the paper's grid of settings x methods x evaluation seeds, and how to run it."""

    preset: str = "cpu"
    """The preset these values started from (cpu | quick | paper); it selects `RECIPES`."""
    out_dir: str = "studies/cpu"
    """Study folder: plan.json, state.json, logs/, runs/, eval/, summary.json, study.png."""
    data_dir: str | None = None
    """MetaICL-format data folder; None: the synthetic suite, written into STUDY/data."""
    synthetic_seed: int = 0
    """Seed of the synthetic suite written when `data_dir` is None."""
    starting_model: str = str(SHIPPED_START)
    """The model every method starts from and the baselines score: a folder (HF or run; the
    default is the shipped copy-pre-trained tiny-128, SHIPPED_START), a Hugging Face id, or a
    built-in random-init config, which the study copy-pre-trains once (`pretrain_steps`)."""
    pretrain_steps: int = 2800
    """Copy pre-training updates (`maml-ds pretrain` through `launch --method copy`) of a
    built-in starting model before anything else; 0: the built-in's random init as is."""
    pretrain_lr: float = 1e-3
    """`--lr` of the copy pre-training (100 warm-up updates, linear decay)."""
    pretrain_micro_batch_size: int = 16
    """`--micro-batch-size` of the copy pre-training (x ranks = its global batch)."""
    prompt_format: str = "spaces"
    """`--format` of every training and evaluation (newlines: MetaICL's; spaces)."""
    tasks: str = "fresh"
    """`--tasks` of every meta-training: fresh synthetic tasks (unmemorisable), or files."""
    copy_share: float = 1 / 3
    """`--copy-share` with fresh tasks: share of copy prompts (keeps the copying skill)."""
    score_demonstrations: bool = True
    """`--score-demonstrations`: every demonstration's label is scored too."""
    settings: tuple[str, ...] = ("synthetic",)
    """Meta-training settings (names in the data folder's config/ or MetaICL's)."""
    parts: tuple[str, ...] = ("complete",)
    """complete (Tables 2/3), limited (--train-fraction), adapt (Table 4, of the complete
    runs), ablation (Table 5)."""
    methods: tuple[str, ...] = ("metaicl", "maml-2-1", "maml-2-4")
    """Meta-training methods (metaicl, maml-2k-n, fomaml-2k-n); No ICL and Raw LM always run."""
    variants: tuple[str, ...] = ("direct",)
    """direct and/or channel models."""
    scopes: tuple[str, ...] = ("all",)
    """Test tasks: all (Table 3) and/or unseen (the unseen-domain ones, Table 2)."""
    eval_seeds: tuple[int, ...] = (100, 13, 21, 42, 87)
    """Demonstration seeds of every evaluation (the spread in the report is over these)."""
    k: int = 16
    """Demonstrations per prompt, in training and evaluation."""
    train_seed: int = 100
    """`--seed` of every training (the paper: 100)."""
    train_fraction: float = 0.1
    """`--train-fraction` of the limited part and of the ablation (paper: 10%)."""
    micro_batch_size: int = 8
    """`--micro-batch-size` (prompts per rank per forward pass; the paper: 1)."""
    save_every: int = 0
    """`--save-every`: checkpoints a killed training resumes from (0: only at the end)."""
    second_order: str = "hvp-fd"
    """`--second-order` of the MAML methods."""
    launch_preset: str = "cpu"
    """`maml-ds launch --preset` (cpu, v100-32gb, v100-16gb, a100-80gb)."""
    nodes: int = 1
    """`launch --nodes`."""
    gpus: int = 2
    """`launch --gpus`: GPUs per node, or CPU ranks with the cpu preset."""
    hostfile: str | None = None
    """`launch --hostfile` (several nodes)."""
    master_port: int = 29500
    """`launch --master-port` of every training (they run one at a time)."""
    adapt_lr: float = 1e-7
    """`maml-ds adapt --lr` (paper 5.4: 1e-7)."""
    adapt_steps: int = 16
    """`maml-ds adapt --steps` (paper: 16 = one pass over the 16 points)."""
    ablation_setting: str = "synth_non_nli_to_nli"
    """The ablation's setting (the paper: non_nli_to_nli)."""
    eval_batch_size: int = 16
    """`eval --batch-size` (the paper: 16)."""
    train_options: tuple[str, ...] = ()
    """More `maml-ds train` options for every training (e.g. a newer flag)."""
    eval_options: tuple[str, ...] = ()
    """More options for every `maml-ds eval` and `maml-ds adapt`."""
    recipes: dict[str, Recipe] = field(default_factory=lambda: dict(RECIPES["cpu"]))
    """method -> Recipe, from `RECIPES[preset]`."""

    def problems(self) -> list[str]:
        """Every problem, each naming the flag that fixes it."""
        out: list[str] = []
        name_re = re.compile(r"^[A-Za-z0-9._-]+$")
        for flag, values, valid in (
            ("--parts", self.parts, PARTS),
            ("--variants", self.variants, get_args(Variant)),
            ("--scopes", self.scopes, get_args(Scope)),
        ):
            if not values:
                out.append(f"{flag} is empty; choose from {', '.join(valid)}")
            out += [f"{flag}: unknown {v!r}; choose from {', '.join(valid)}" for v in values
                    if v not in valid]  # fmt: skip
        if not self.settings:
            out.append("--settings is empty")
        settings = (*self.settings, *((self.ablation_setting,) if "ablation" in self.parts else ()))
        for setting in settings:
            if not name_re.match(setting):
                out.append(f"setting {setting!r}: give a setting name (letters, digits, ._-)")
            elif self.data_dir is None and setting not in SYNTHETIC_SETTINGS:
                out.append(
                    f"setting {setting!r} is not one of the synthetic suite's "
                    f"({', '.join(SYNTHETIC_SETTINGS)}): give --data DIR, a MetaICL data folder "
                    "(`maml-ds data build`)"
                )
        ablation = {row.method for row in ABLATION_ROWS} if "ablation" in self.parts else set()
        trained = set(self.methods) | ablation
        if not self.methods and {"complete", "limited", "adapt"} & set(self.parts):
            out.append("--methods is empty")
        for method in sorted(trained):
            try:
                parse_method(method)
            except ConfigError as err:
                out += [f"--methods: {p}" for p in err.problems]
                continue
            if method not in self.recipes:
                out.append(
                    f"no recipe for {method!r} in preset {self.preset!r} "
                    f"(maml_ds/study/config.py RECIPES has: {', '.join(self.recipes)})"
                )
        if len(set(self.eval_seeds)) != len(self.eval_seeds) or not self.eval_seeds:
            out.append(f"--seeds must be distinct seeds, got {list(self.eval_seeds)}")
        if not 0.0 < self.train_fraction <= 1.0:
            out.append(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        for flag, value in (("--gpus", self.gpus), ("--nodes", self.nodes), ("k", self.k)):
            if value < 1:
                out.append(f"{flag} must be >= 1, got {value}")
        if self.adapt_steps < 1:
            out.append(f"adapt steps must be >= 1, got {self.adapt_steps}")
        if self.prompt_format not in ("newlines", "spaces"):
            out.append(f"--format must be newlines or spaces, got {self.prompt_format!r}")
        if self.tasks not in ("files", "fresh"):
            out.append(f"--tasks must be files or fresh, got {self.tasks!r}")
        if (
            self.tasks == "fresh"
            and self.data_dir is not None
            and not is_synthetic_suite(self.data_dir)
        ):
            out.append(
                "--tasks fresh draws synthetic tasks: it needs the synthetic suite (no --data); "
                "pass --tasks files with a data folder"
            )
        if Path(self.starting_model) == SHIPPED_START and (
            self.synthetic_seed != 0
            or (self.data_dir is not None and not is_synthetic_suite(self.data_dir))
        ):
            out.append(
                "the shipped starting model knows the words of the synthetic suite of seed 0 "
                "only: give --starting-model (e.g. tiny, copy-pre-trained in the study, or a "
                "model of your data)"
            )
        if self.pretrain_steps < 0:
            out.append(f"--pretrain-steps must be >= 0, got {self.pretrain_steps}")
        return out

    def validate(self) -> StudyConfig:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _paper() -> StudyConfig:
    return StudyConfig(
        preset="paper",
        out_dir="studies/paper",
        starting_model="gpt2-medium",
        settings=PAPER_SETTINGS,
        parts=PARTS,
        variants=("direct", "channel"),
        scopes=("all", "unseen"),  # "all" first: the unseen tasks then come from its cache
        micro_batch_size=1,
        pretrain_steps=0,
        prompt_format="newlines",
        tasks="files",
        copy_share=0.0,
        score_demonstrations=False,
        save_every=5000,
        launch_preset="v100-32gb",
        gpus=8,
        ablation_setting="non_nli_to_nli",
        recipes=dict(RECIPES["paper"]),
    )


PRESETS = {
    "cpu": lambda: StudyConfig(),
    "quick": lambda: StudyConfig(
        preset="quick",
        out_dir="studies/quick",
        methods=("metaicl", "maml-2-1"),
        scopes=("unseen",),
        eval_seeds=(100, 13),
        gpus=1,
        starting_model="tiny",
        pretrain_steps=4,
        recipes=dict(RECIPES["quick"]),
    ),
    "paper": _paper,
}
"""cpu: the synthetic suite on 2 CPU ranks (the README's first command); quick: the smallest
study that runs every kind of step (CI); paper: Tables 2-5 on real data and 8 V100s."""


def preset_config(name: str) -> StudyConfig:
    """A fresh StudyConfig of a preset; ConfigError naming the presets otherwise."""
    if name not in PRESETS:
        raise ConfigError([f"unknown study preset {name!r}; choose from {', '.join(PRESETS)}"])
    return PRESETS[name]()
