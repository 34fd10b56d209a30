"""The run's DeepSpeed JSON, built from a RunConfig: the one builder (batch arithmetic checked,
gradient clipping always explicit), and the merge of a user's `--deepspeed-config` over it
(user keys win unless they contradict a maml-ds setting). See docs/launch.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maml_ds.config import ConfigError, RunConfig


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` on ``world_size`` ranks (the one place it is built).

    The optimizer is a client optimizer (``SharedMomentAdamW``) and the LR schedule is a
    client scheduler, so neither appears here. ``gradient_clipping`` is always explicit
    (DeepSpeed 0.19 defaults to 1.0, which would silently clip meta-gradients).
    """
    if world_size < 1:
        raise ConfigError([f"world size must be >= 1, got {world_size}"])
    ds = cfg.deepspeed
    spec = cfg.method_spec
    # A MAML meta-update is one engine.backward of the task-mean meta-gradient and one step
    # (the n tasks accumulate in this rank's partition, maml_ds/training/maml.py).
    gas = ds.gradient_accumulation_steps if spec.kind != "maml" else 1
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": ds.micro_batch_size * gas * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
        "csv_monitor": {
            "enabled": True,
            "output_path": str(Path(cfg.out_dir) / "monitor"),
            "job_name": "train",
        },
    }
    if ds.zero_stage in (1, 2, 3):
        config["zero_optimization"].update(
            {
                "reduce_bucket_size": ds.reduce_bucket_size,
                "allgather_bucket_size": ds.allgather_bucket_size,
                "overlap_comm": False,
                "contiguous_gradients": True,
            }
        )
    if ds.zero_stage == 3:
        config["zero_optimization"].update(
            {
                "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
                "stage3_prefetch_bucket_size": ds.reduce_bucket_size,
            }
        )
        if spec.kind == "maml":  # the sharded path: release each layer after use, or DeepSpeed
            # keeps gathered layers alive through every pass (docs/memory.md, "The sharded path")
            config["zero_optimization"].update(
                {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0}
            )
        config["zero_optimization"].pop("allgather_bucket_size")
    if ds.precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": ds.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if ds.config_file is not None:
        config = merge_deepspeed_config(config, read_deepspeed_json(ds.config_file), ds.config_file)
    check_batch_arithmetic(config, world_size)
    return config


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """A user's DeepSpeed JSON (--deepspeed-config) as a dict; ConfigError if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError([f"--deepspeed-config {path} does not exist"]) from None
    except json.JSONDecodeError as err:
        raise ConfigError([f"--deepspeed-config {path} is not valid JSON: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--deepspeed-config {path} must hold a JSON object"])
    return data


_SET_BY_MAML_DS = {
    "train_batch_size": "--micro-batch-size x --gradient-accumulation-steps x world size",
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "gradient_clipping": "--gradient-clipping",
}  # DeepSpeed keys a RunConfig setting decides: a user's JSON may repeat them, not change them
_CLIENT_OBJECTS = {
    "optimizer": "its own optimizer (SharedMomentAdamW: --lr, --betas, --eps, --weight-decay)",
    "scheduler": "its own LR schedule (--schedule, --warmup-steps)",
}


def merge_deepspeed_config(
    built: dict[str, Any], user: dict[str, Any], source: str | Path
) -> dict[str, Any]:
    """`user` merged over `built`, object by object; a ConfigError names every user key that
    contradicts a maml-ds setting (batch sizes, client optimizer and scheduler, clipping, ZeRO
    stage, precision)."""
    problems = deepspeed_contradictions(built, user, source)
    if problems:
        raise ConfigError(list(problems.values()))
    return _deep_merge(built, user)


def deepspeed_contradictions(
    built: dict[str, Any], user: dict[str, Any], source: str | Path
) -> dict[str, str]:
    """{key (dotted) of `user`: the message} for every key that contradicts a maml-ds setting."""
    out: dict[str, str] = {}
    for key, why in _CLIENT_OBJECTS.items():
        if key in user:
            out[key] = f"{source} sets `{key}`, but maml-ds passes {why} to DeepSpeed: remove it"
    for key, flag in _SET_BY_MAML_DS.items():
        if key in user and user[key] != built[key]:
            out[key] = (
                f"{source} sets {key} = {user[key]!r} but maml-ds's config has {built[key]!r} "
                f"({flag}): remove {key} from {source} or change {flag.split(' ')[0]}"
            )
    zero, stage = user.get("zero_optimization"), built["zero_optimization"]["stage"]
    if isinstance(zero, dict) and zero.get("stage", stage) != stage:
        out["zero_optimization.stage"] = (
            f"{source} sets zero_optimization.stage = {zero['stage']!r} but maml-ds runs "
            f"--zero {stage}: remove the stage from {source} or pass --zero {zero['stage']}"
        )
    precision = "fp16" if "fp16" in built else "bf16" if "bf16" in built else "fp32"
    for key, means in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16"), ("amp", "amp")):
        section = user.get(key)
        enabled = section.get("enabled") if isinstance(section, dict) else None
        if not isinstance(enabled, bool) or enabled == (means == precision):
            continue
        change = f" or pass --precision {means}" if enabled and means != "amp" else ""
        out[key] = (
            f"{source} sets {key}.enabled = {str(enabled).lower()} but maml-ds runs --precision "
            f"{precision}: remove `{key}` from {source}{change}"
        )
    return out


def without_keys(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """`config` without the dotted `keys` (e.g. ``zero_optimization.stage``)."""
    out = {k: v for k, v in config.items() if k not in keys}
    for head, _, rest in (key.partition(".") for key in keys):
        if rest and isinstance(out.get(head), dict):
            out[head] = without_keys(out[head], [rest])
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def check_batch_arithmetic(config: dict[str, Any], world_size: int) -> None:
    """DeepSpeed's rule: train_batch_size = micro x accumulation x world size."""
    micro = config["train_micro_batch_size_per_gpu"]
    gas = config["gradient_accumulation_steps"]
    total = config["train_batch_size"]
    if micro * gas * world_size != total:
        raise ConfigError(
            [
                f"batch arithmetic: train_batch_size {total} != micro {micro} x accumulation "
                f"{gas} x world size {world_size} = {micro * gas * world_size}"
            ]
        )
