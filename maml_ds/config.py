"""Typed configuration for every maml-ds run: the one place a setting is defined.

:class:`RunConfig` says what a run accepts: each field, with its docstring, is also a
`maml-ds train` flag (launcher/config_flags.py derives them). :meth:`RunConfig.validate` collects
*every* problem into one :class:`ConfigError`, each naming the flag that fixes it; the rules the
engine imposes live in :func:`engine_problems`. The DeepSpeed JSON is built from it by
`maml_ds.deepspeed_json.build_deepspeed_config` and nowhere else. See docs/launch.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from maml_ds.files import write_atomic
from maml_ds.meta.gradient import FdMode, SecondOrder
from maml_ds.meta.optim import OptimizerName

Precision = Literal["fp32", "fp16", "bf16"]
AdaptedRounding = Literal["nearest", "stochastic"]
ZERO_STAGES = (0, 1, 2, 3)
Variant = Literal["direct", "channel"]
PromptLayout = Literal["newlines", "spaces"]
TaskSource = Literal["files", "fresh"]


class ConfigError(ValueError):
    """A user-facing configuration problem; the message lists every problem and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------------------------
# Method strings: "metaicl", "maml-2k-n", "fomaml-2k-n"
# --------------------------------------------------------------------------------------------

_METHOD_RE = re.compile(r"^(maml|fomaml)-(\d+)-(\d+)$")
METHOD_FORMS = (
    "'metaicl' (multi-task ICL training)",
    "'maml-2k-n' (second-order MAML: k support + k query batches per task, n tasks per "
    "meta-update, e.g. maml-2-1, maml-2-4, maml-4-2)",
    "'fomaml-2k-n' (the first-order variant, e.g. fomaml-2-4)",
    "'copy' (copy pre-training of a starting model: `maml-ds pretrain`)",
)


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method string."""

    name: str
    """The string as given, e.g. ``maml-2-4``."""
    kind: Literal["metaicl", "maml", "copy"]
    num_inner_steps: int = 0
    """k: support batches (= inner steps) and query batches per task."""
    num_tasks: int = 1
    """n: tasks per meta-update."""
    first_order: bool = False

    @property
    def batches_per_update(self) -> int:
        """Batches one optimizer update consumes (MetaICL: 1; MAML-2k-n: 2kn)."""
        return 1 if self.kind != "maml" else 2 * self.num_inner_steps * self.num_tasks


def parse_method(text: str) -> MethodSpec:
    """Parse ``metaicl`` / ``maml-2k-n`` / ``fomaml-2k-n``; raise :class:`ConfigError` otherwise."""
    name = text.strip().lower()
    if name in ("metaicl", "copy"):
        return MethodSpec(name=name, kind=name)
    match = _METHOD_RE.match(name)
    problems: list[str] = []
    if match is None:
        problems.append(f"unknown method {text!r}; valid forms: " + "; ".join(METHOD_FORMS))
        raise ConfigError(problems)
    two_k, n = int(match.group(2)), int(match.group(3))
    if two_k < 2 or two_k % 2:
        problems.append(
            f"method {text!r}: the first number is 2k (support + query batches per task) and "
            f"must be an even number >= 2 (k >= 1), got {two_k}; e.g. maml-2-{max(n, 1)}"
        )
    if n < 1:
        problems.append(f"method {text!r}: n (tasks per meta-update) must be >= 1, got {n}")
    if problems:
        raise ConfigError(problems)
    return MethodSpec(
        name=name,
        kind="maml",
        num_inner_steps=two_k // 2,
        num_tasks=n,
        first_order=match.group(1) == "fomaml",
    )


def adaptation_problems(keep_support_gradients: int | None, adapted_rounding: str) -> list[str]:
    """Out-of-range --keep-support-gradients or --adapted-rounding (shared by
    :meth:`RunConfig.problems` and the memory model)."""
    out: list[str] = []
    if keep_support_gradients is not None and keep_support_gradients < 0:
        out.append(
            f"--keep-support-gradients must be >= 0 (default k - 1), got {keep_support_gradients}"
        )
    if adapted_rounding not in get_args(AdaptedRounding):
        out.append(f"--adapted-rounding must be nearest or stochastic, got {adapted_rounding!r}")
    return out


def deepspeed_problems(zero_stage: int, precision: str) -> list[str]:
    """Out-of-range ZeRO stage or precision (shared by :meth:`RunConfig.problems` and the memory
    model)."""
    out: list[str] = []
    if zero_stage not in ZERO_STAGES:
        out.append(f"--zero must be 0, 1, 2 or 3, got {zero_stage}")
    if precision not in get_args(Precision):
        out.append(f"--precision must be fp32, fp16 or bf16, got {precision!r}")
    return out


def engine_problems(
    spec: MethodSpec, zero_stage: int, precision: str, second_order: str
) -> list[str]:
    """What the training engine cannot run: the one place these rules live.

    Used by :meth:`RunConfig.problems` and the memory model.
    """
    if spec.kind != "maml":
        return []
    out: list[str] = []
    if zero_stage == 3 and not spec.first_order and second_order in ("exact", "hvp"):
        out.append(
            f"--second-order {second_order} needs double backward, which ZeRO-3 "
            "cannot do (its hooks re-partition parameters); use --second-order hvp-fd "
            "(finite-difference HVPs, the default) or --zero 0/1/2"
        )
    if precision == "fp16" and not spec.first_order and second_order != "hvp-fd":
        out.append(
            f"--second-order {second_order} with --precision fp16 is not supported: "
            "double backward through loss-scaled fp16 overflows; use hvp-fd"
        )
    if zero_stage == 0 and precision != "fp32":
        out.append(
            f"--zero 0 with --precision {precision}: DeepSpeed wraps the client "
            "optimizer in its own mixed-precision optimizer there (and steps it once at "
            "start-up); use --zero 1 or 2 for fp16/bf16"
        )
    return out


# --------------------------------------------------------------------------------------------
# The config tree
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Model and tokenizer."""

    name: str = "tiny"
    """A built-in config (tiny, small-test, gpt2, gpt2-medium, gpt2-large, gpt2-xl: random
    init), a local model folder, or a Hugging Face id (downloaded only because you asked)."""
    tokenizer: str | None = None
    """Tokenizer folder or id; default: the model's own, or for built-in configs a byte-level
    BPE trained locally on the data and saved in the run folder."""
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    """Attention kernel. Exact second order needs double backward: eager (or math SDPA)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward (Hugging Face gradient
    checkpointing): the activations of one layer instead of all, one more forward per pass."""
    dropout: float = 0.0
    """Dropout of the model (GPT-2's resid/embd/attn pdrop). 0 by default: finite-difference
    HVPs and exact resume need a deterministic loss; MetaICL's GPT-2 used 0.1."""


@dataclass
class DataConfig:
    """Meta-training data and prompts."""

    data_dir: str = "data/synthetic"
    """MetaICL-format data folder ({task}/{task}_{k}_{seed}_{split}.jsonl)."""
    setting: str = "synthetic"
    """Setting name (built-in MetaICL names, or {data_dir}/config/{name}.json) or a path."""
    variant: Variant = "direct"
    """Prompt variant: direct (score the output) or channel (score the input)."""
    num_demonstrations: int = 16
    """k demonstrations per prompt (MetaICL: 16)."""
    max_length_per_example: int = 256
    """Token cap of one demonstration or test example (MetaICL: 256)."""
    max_length: int = 1024
    """Token cap of a whole prompt (MetaICL: 1024)."""
    train_fraction: float = 1.0
    """Limited-data setting (paper 5.1): keep this share of each training task, stratified."""
    max_examples_per_task: int | None = None
    """Cap on meta-training examples read per task (default: all)."""
    format: PromptLayout = "newlines"
    """Prompt layout: newlines (MetaICL's separators) or spaces (" "+input " "+output, the
    Raw-LM layout; with the synthetic suite's word tokenizer nothing stands between an input
    and its label)."""
    tasks: TaskSource = "files"
    """files: the setting's training task files; fresh: a new synthetic task for every prompt
    (MetaICL) or MAML task, drawn from the suite's training vocabulary and rules, so nothing can
    be memorised (synthetic suites only; docs/study.md)."""
    copy_share: float = 0.0
    """--tasks fresh: share of prompts that are free-form copy prompts (no demonstrations)."""
    score_demonstrations: bool = False
    """Score every demonstration's output too (channel: its input), not only the target's."""


@dataclass
class OptimConfig:
    """Outer (meta) optimizer and LR schedule."""

    lr: float = 1e-5
    """Outer (meta) learning rate; MetaICL's lr for --method metaicl."""
    weight_decay: float = 0.0
    """AdamW weight decay of the outer optimizer."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (first and second moment), shared by the inner optimizer."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warm-up, in optimizer updates."""
    schedule: Literal["linear", "constant"] = "linear"
    """linear: decay to 0 at max_steps (MetaICL); constant: no decay."""
    gradient_clipping: float | None = None
    """Global-norm clipping; default: the method's (MetaICL 1.0; MAML off, as in the paper);
    0 = off."""


@dataclass
class MetaConfig:
    """MAML-en-LLM: the inner and second-order settings (MetaICL follows only the outer
    optimizer settings, --outer-optimizer and --no-shared-moments: the Table 5 ablation)."""

    inner_lr: float = 1e-5
    """Learning rate of the inner (support-set) steps."""
    second_order: SecondOrder = "hvp-fd"
    """How the meta-gradient's second-order term is computed (docs/meta-gradient.md)."""
    fd_mode: FdMode = "one-sided"
    """Finite-difference HVP scheme for --second-order hvp-fd."""
    fd_scale: float | None = None
    """Finite-difference step r: ||eps*w|| = r * ||theta||; default: the measured one of the
    compute dtype and fd_mode (docs/meta-gradient.md; fp32 one-sided 1e-5)."""
    inner_optimizer: OptimizerName = "adamw"
    """Optimizer of the inner steps."""
    outer_optimizer: OptimizerName = "adamw"
    """Optimizer of the meta-update (and of MetaICL's update)."""
    shared_moments: bool = True
    """Inner and outer AdamW share their moments (--no-shared-moments: fresh inner state per
    meta-update)."""
    keep_support_gradients: int | None = None
    """hvp-fd, k >= 2: support gradients kept from the inner steps for the reverse pass (one
    fp32 partition each; host memory on the ZeRO-3 sharded path): fewer support passes, the same
    meta-gradient. Default k - 1, all (3k passes per task); 1 keeps g_S(theta_0) only."""
    adapted_rounding: AdaptedRounding = "nearest"
    """bf16/fp16 MAML: how the adapted parameters (fp32) are rounded into the forward's dtype:
    nearest, or stochastic (unbiased: a sub-ulp inner step survives in expectation; the draws
    are fixed per batch, so every pass on one batch rounds alike). docs/memory.md."""


def kept_support_gradients(keep: int | None, num_inner_steps: int) -> int:
    """How many support gradients an hvp-fd task of k inner steps keeps for `keep` (the
    --keep-support-gradients setting; None: all): at most k - 1."""
    most = max(num_inner_steps - 1, 0)
    return most if keep is None else min(keep, most)


@dataclass
class DeepSpeedOptions:
    """DeepSpeed engine."""

    zero_stage: int = 0
    """ZeRO stage: 0, 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters)."""
    precision: Precision = "fp32"
    """Compute precision; fp16 uses dynamic loss scaling."""
    micro_batch_size: int = 1
    """Prompts per rank per forward pass (MetaICL: 1)."""
    gradient_accumulation_steps: int = 1
    """MetaICL only: micro-batches per optimizer step."""
    reduce_bucket_size: int = 50_000_000
    """ZeRO reduce bucket, in elements (also ZeRO-3's prefetch bucket)."""
    allgather_bucket_size: int = 50_000_000
    """ZeRO-1/2 all-gather bucket, in elements."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters smaller than this (elements) stay unpartitioned."""
    loss_scale_window: int = 1000
    """fp16: overflow-free steps before the loss scale grows."""
    initial_scale_power: int = 16
    """fp16: the initial loss scale is 2**this."""
    config_file: str | None = None
    """A DeepSpeed JSON merged over the one maml-ds builds (monitors, offload, ...): its keys
    win unless they contradict a maml-ds setting (docs/launch.md)."""


@dataclass
class CopyConfig:
    """Copy pre-training (--method copy, `maml-ds pretrain`): random token strings after a random
    prefix, then repeated; the loss scores the repeat after its first token (docs/pretrain.md)."""

    copy_min_length: int = 8
    """Shortest copied string, in tokens."""
    copy_max_length: int = 24
    """Longest copied string, in tokens."""
    copy_max_prefix: int = 12
    """Longest random prefix before the string."""
    copy_position_offset: int = 200
    """From --copy-offset-from on, every sequence starts at a random position in [0, this]:
    positions a prompt reaches are trained too."""
    copy_offset_from: int = 2000
    """First update with position offsets (0: from the start)."""


@dataclass
class RunConfig:
    """One run: the method, its folder, length and seed, and a section per component."""

    method: str = "metaicl"
    """metaicl | maml-2k-n | fomaml-2k-n (k support + k query batches per task, n tasks per
    meta-update)."""
    out_dir: str = "runs/demo"
    """Run folder: config, checkpoints, history, the exported model."""
    max_steps: int = 100
    """Optimizer updates: MetaICL steps or meta-updates."""
    seed: int = 100
    """Seed of the model initialisation, the task sampler and --train-fraction subsampling."""
    save_every: int = 0
    """Checkpoint every N updates (0: only at the end)."""
    log_every: int = 10
    """A progress line every N updates when stderr is not a terminal (on one: a live bar)."""
    deterministic: bool = True
    """Deterministic torch algorithms (exact resume and reproducible losses)."""
    validate_every: int = 0
    """Score the setting's validation tasks before the first update, every N updates and at
    the end (0: never): history.jsonl gets val_score and val_<family>, RUN/best the
    best-scoring weights (the starting ones when no update beats them)."""
    max_consecutive_skips: int = 10
    """Stop (exit 3, with a checkpoint of the last good weights) after this many updates in a
    row were not applied (non-finite loss or gradient, or an fp16 overflow); 0 never stops."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    copy: CopyConfig = field(default_factory=CopyConfig)

    # ---------------------------------------------------------------- derived
    @property
    def method_spec(self) -> MethodSpec:
        return parse_method(self.method)

    @property
    def gradient_clipping(self) -> float:
        if self.optim.gradient_clipping is not None:
            return float(self.optim.gradient_clipping)
        return 0.0 if self.method_spec.kind == "maml" else 1.0

    # ---------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every problem of this config, each naming the flag that fixes it."""
        out: list[str] = []
        try:
            spec: MethodSpec | None = parse_method(self.method)
        except ConfigError as err:
            out.extend(err.problems)
            spec = None
        if self.max_steps < 1:
            out.append(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.save_every < 0:
            out.append(f"--save-every must be >= 0, got {self.save_every}")
        if self.max_consecutive_skips < 0:
            out.append(f"--max-consecutive-skips must be >= 0, got {self.max_consecutive_skips}")
        if self.log_every < 1:
            out.append(f"--log-every must be >= 1, got {self.log_every}")
        d, o, m, ds = self.data, self.optim, self.meta, self.deepspeed
        if not 0.0 <= self.model.dropout < 1.0:
            out.append(f"--dropout must be in [0, 1), got {self.model.dropout}")
        if d.variant not in get_args(Variant):
            out.append(f"--variant must be direct or channel, got {d.variant!r}")
        if d.num_demonstrations < 0:
            out.append(f"--k (demonstrations) must be >= 0, got {d.num_demonstrations}")
        if d.max_length_per_example < 8 or d.max_length < d.max_length_per_example:
            out.append(
                "need 8 <= max_length_per_example <= max_length, got "
                f"{d.max_length_per_example} and {d.max_length}"
            )
        if not 0.0 < d.train_fraction <= 1.0:
            out.append(f"--train-fraction must be in (0, 1], got {d.train_fraction}")
        if d.format not in get_args(PromptLayout):
            out.append(f"--format must be newlines or spaces, got {d.format!r}")
        if d.tasks not in get_args(TaskSource):
            out.append(f"--tasks must be files or fresh, got {d.tasks!r}")
        if not 0.0 <= d.copy_share < 1.0:
            out.append(f"--copy-share must be in [0, 1), got {d.copy_share}")
        if d.copy_share and d.tasks != "fresh":
            out.append("--copy-share needs --tasks fresh (copy prompts are drawn with them)")
        if self.validate_every < 0:
            out.append(f"--validate-every must be >= 0, got {self.validate_every}")
        c = self.copy
        if not 1 <= c.copy_min_length <= c.copy_max_length:
            out.append(
                "need 1 <= --copy-min-length <= --copy-max-length, got "
                f"{c.copy_min_length} and {c.copy_max_length}"
            )
        if c.copy_max_prefix < 0 or c.copy_position_offset < 0 or c.copy_offset_from < 0:
            out.append("--copy-max-prefix, --copy-position-offset, --copy-offset-from must be >= 0")
        if o.lr <= 0:
            out.append(f"--lr/--outer-lr must be > 0, got {o.lr}")
        if o.weight_decay < 0:
            out.append(f"--weight-decay must be >= 0, got {o.weight_decay}")
        if o.gradient_clipping is not None and o.gradient_clipping < 0:
            out.append(f"--gradient-clipping must be >= 0 (0 = off), got {o.gradient_clipping}")
        if o.schedule not in ("linear", "constant"):
            out.append(f"--schedule must be linear or constant, got {o.schedule!r}")
        if m.inner_lr < 0:
            out.append(f"--inner-lr must be >= 0, got {m.inner_lr}")
        if m.second_order not in get_args(SecondOrder):
            out.append(
                f"--second-order must be one of {', '.join(get_args(SecondOrder))}, "
                f"got {m.second_order!r}"
            )
        for flag, value in (
            ("--inner-optimizer", m.inner_optimizer),
            ("--outer-optimizer", m.outer_optimizer),
        ):
            if value not in get_args(OptimizerName):
                out.append(f"{flag} must be sgd or adamw, got {value!r}")
        out.extend(adaptation_problems(m.keep_support_gradients, m.adapted_rounding))
        second_order_maml = (
            spec is not None
            and spec.kind == "maml"
            and not spec.first_order
            and m.second_order != "first-order"
        )
        if (
            m.adapted_rounding == "stochastic"
            and second_order_maml
            and ds.precision != "fp32"
            and not m.shared_moments
            and m.inner_optimizer == "adamw"
        ):
            out.append(
                "--adapted-rounding stochastic with --no-shared-moments: fresh-moment AdamW inner "
                "steps weigh the second-order term by 1/|g|, and stochastic rounding made that "
                "meta-gradient 7-40x further off than nearest (docs/memory.md); use nearest, "
                "shared moments, or a first-order method"
            )
        if m.fd_mode not in get_args(FdMode):
            out.append(f"--fd-mode must be one-sided or central, got {m.fd_mode!r}")
        if m.fd_scale is not None and not 0.0 < m.fd_scale < 1.0:
            out.append(f"--fd-scale must be in (0, 1), got {m.fd_scale}")
        out.extend(deepspeed_problems(ds.zero_stage, ds.precision))
        if ds.config_file is not None and not Path(ds.config_file).is_file():
            out.append(f"--deepspeed-config {ds.config_file} does not exist")
        if ds.micro_batch_size < 1:
            out.append(f"--micro-batch-size must be >= 1, got {ds.micro_batch_size}")
        if ds.gradient_accumulation_steps < 1:
            out.append(
                f"--gradient-accumulation-steps must be >= 1, got {ds.gradient_accumulation_steps}"
            )
        if spec is not None and spec.kind == "maml":
            if ds.gradient_accumulation_steps != 1:
                out.append(
                    "--gradient-accumulation-steps applies to --method metaicl only; a MAML "
                    "meta-update already accumulates its n tasks (use n in maml-2k-n)"
                )
        if spec is not None:
            out.extend(engine_problems(spec, ds.zero_stage, ds.precision, m.second_order))
        if spec is not None and spec.kind == "maml" and self.model.activation_checkpointing:
            mode = "first-order" if spec.first_order else m.second_order
            if not (ds.zero_stage == 3 and mode in ("hvp-fd", "first-order")) or (
                ds.precision == "fp16"
            ):
                out.append(
                    "--activation-checkpointing with MAML needs the sharded path (--zero 3, "
                    "--second-order hvp-fd or a fomaml method, fp32 or bf16): elsewhere the "
                    "engine's functional forward would be recomputed at the wrong parameters"
                )
        return out

    def validate(self) -> RunConfig:
        """Raise one :class:`ConfigError` listing every problem; return self when valid."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, data, "")

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError([f"config file {path} is not valid JSON: {err}"]) from err
        return cls.from_dict(data)


T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError([f"config section {prefix or '<root>'} must be an object"])
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            [
                f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: "
                + ", ".join(sorted(names))
            ]
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, f"{prefix}{key}.")  # type: ignore[arg-type]
        elif get_origin(hint) is tuple and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)
