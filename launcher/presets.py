"""Hardware presets for `maml-ds launch`: a DeepSpeed JSON each, plus what JSON cannot say.

The JSONs live once, in the repository's ``ds_configs/``; ``launcher/ds_configs`` is a relative
symlink to it, so they are package data (a wheel holds the files). A preset JSON is a fragment
of what `maml_ds.deepspeed_json.build_deepspeed_config` produces, never a second builder:
`apply_preset` reads it into `RunConfig.deepspeed`, and `check_preset_is_reproduced` verifies
that the builder gives back every key the file sets. See docs/launch.md ("Presets").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_args

from maml_ds.config import ConfigError, Precision, RunConfig
from maml_ds.deepspeed_json import build_deepspeed_config


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    accelerator: str
    """DeepSpeed accelerator: "cuda", or "cpu" (DS_ACCELERATOR=cpu in the ranks' environment)."""
    precisions: tuple[str, ...]
    """Precisions the hardware runs; the first is the preset's (the JSON's) own."""
    device_memory_gb: float | None
    """Memory of one device (GB), for the launch-time memory check; None on CPU."""

    @property
    def file(self) -> str:
        return f"{self.name}.json"

    def env(
        self, ranks_per_node: int, environ: Mapping[str, str], num_cores: int
    ) -> dict[str, str]:
        """Environment the launched ranks need on top of `environ`: on CPU, the accelerator and
        an even share of this machine's `num_cores` per rank (OMP_NUM_THREADS, unless set)."""
        if self.accelerator != "cpu":
            return {}
        out = {"DS_ACCELERATOR": "cpu"}
        if "OMP_NUM_THREADS" not in environ:
            out["OMP_NUM_THREADS"] = str(max(1, num_cores // max(1, ranks_per_node)))
        return out


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "v100-32gb",
            "NVIDIA V100 32 GB (the paper's nodes): fp16 with dynamic loss scaling (V100 has no "
            "bf16), ZeRO-1",
            "cuda", ("fp16", "fp32"), 32.0,
        ),
        Preset(
            "v100-16gb",
            "NVIDIA V100 16 GB: fp16 with dynamic loss scaling, ZeRO-2 (gradients partitioned), "
            "smaller buckets",
            "cuda", ("fp16", "fp32"), 16.0,
        ),
        Preset(
            "a100-80gb",
            "NVIDIA A100 80 GB: bf16 (no loss scaling), ZeRO-1",
            "cuda", ("bf16", "fp16", "fp32"), 80.0,
        ),
        Preset(
            "cpu",
            "CPU ranks on one machine (laptop, CI): accelerator cpu, gloo, fp32, ZeRO-0",
            "cpu", ("fp32", "bf16"), None,
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Device:
    """One CUDA device as the launch sees it."""

    name: str
    memory_gib: float


def local_devices() -> list[Device]:
    """This machine's CUDA devices (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [Device(p.name, p.total_memory / 2**30) for p in props]


def preset_for_devices(devices: Sequence[Device]) -> tuple[Preset, str]:
    """The preset that fits these devices, and why (printed by launch)."""
    if not devices:
        return PRESETS["cpu"], "no CUDA device on this machine: CPU ranks"
    first = devices[0]
    seen = f"{len(devices)} x {first.name} ({first.memory_gib:.0f} GiB)"
    if "V100" in first.name.upper():
        name = "v100-32gb" if first.memory_gib > 24 else "v100-16gb"
        return PRESETS[name], f"{seen}: {name}"
    if first.memory_gib >= 60:
        return PRESETS["a100-80gb"], f"{seen}: a100-80gb (bf16)"
    name = "v100-32gb" if first.memory_gib > 24 else "v100-16gb"
    return PRESETS[name], f"{seen}: no preset of its own, {name} (fp16) fits its memory"


def resolve_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            [f"unknown preset {name!r}; --preset is one of: {', '.join(PRESETS)}"]
        ) from None


def preset_dir() -> Path:
    """The folder of the preset JSONs inside the installed package."""
    return Path(str(resources.files("launcher") / "ds_configs"))


def load_preset_json(preset: Preset) -> dict[str, Any]:
    path = preset_dir() / preset.file
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"preset file {path} is missing (a broken install?)"]) from None
    except json.JSONDecodeError as err:
        raise ConfigError([f"preset file {path} is not valid JSON: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"preset file {path} must hold a JSON object"])
    return data


def apply_preset(cfg: RunConfig, preset: Preset) -> RunConfig:
    """Set cfg.deepspeed from the preset JSON (in place; returns cfg)."""
    data = load_preset_json(preset)
    ds = cfg.deepspeed
    zero = data.get("zero_optimization", {})
    ds.micro_batch_size = data.get("train_micro_batch_size_per_gpu", ds.micro_batch_size)
    ds.gradient_accumulation_steps = data.get(
        "gradient_accumulation_steps", ds.gradient_accumulation_steps
    )
    ds.zero_stage = zero.get("stage", 0)
    ds.reduce_bucket_size = zero.get("reduce_bucket_size", ds.reduce_bucket_size)
    ds.allgather_bucket_size = zero.get("allgather_bucket_size", ds.allgather_bucket_size)
    ds.stage3_param_persistence_threshold = zero.get(
        "stage3_param_persistence_threshold", ds.stage3_param_persistence_threshold
    )
    fp16, bf16 = data.get("fp16", {}), data.get("bf16", {})
    if fp16.get("enabled") and bf16.get("enabled"):
        raise ConfigError([f"preset {preset.name}: fp16 and bf16 both enabled"])
    ds.precision = "fp16" if fp16.get("enabled") else "bf16" if bf16.get("enabled") else "fp32"
    ds.initial_scale_power = fp16.get("initial_scale_power", ds.initial_scale_power)
    ds.loss_scale_window = fp16.get("loss_scale_window", ds.loss_scale_window)
    if ds.precision != preset.precisions[0]:
        raise ConfigError(
            [
                f"preset {preset.name}: its JSON runs {ds.precision}, its table entry says "
                f"{preset.precisions[0]}"
            ]
        )
    return cfg


def check_preset_is_reproduced(preset: Preset, world_size: int = 1) -> None:
    """Every key the preset JSON sets comes back, with its value, from build_deepspeed_config."""
    cfg = apply_preset(RunConfig(), preset)
    built = build_deepspeed_config(cfg, world_size)
    problems = [
        f"preset {preset.file} sets {key} = {want!r} but maml-ds's DeepSpeed config has "
        f"{got!r}; only keys that maml_ds.deepspeed_json.build_deepspeed_config produces "
        "can be preset"
        for key, want, got in _diff(load_preset_json(preset), built)
    ]
    if problems:
        raise ConfigError(problems)


def _diff(want: dict[str, Any], got: dict[str, Any], prefix: str = ""):
    for key, value in want.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(got.get(key), dict):
            yield from _diff(value, got[key], name + ".")
        elif key not in got or got[key] != value:
            yield name, value, got.get(key, "<absent>")


def check_precision(preset: Preset, precision: str) -> None:
    """A precision the preset's hardware lacks is an error (an unknown one is RunConfig's)."""
    if precision in get_args(Precision) and precision not in preset.precisions:
        why = {
            "bf16": " (V100 has no bf16: use fp16, with dynamic loss scaling)",
            "fp16": " (fp16 needs a GPU)",
        }.get(precision, "")
        raise ConfigError(
            [
                f"--precision {precision} is not available on preset {preset.name}{why}; "
                f"choose one of {', '.join(preset.precisions)}"
            ]
        )


def device_problems(preset: Preset, gpus_per_node: int, devices: Sequence[Device]) -> list[str]:
    """What a real launch of `gpus_per_node` ranks per node on `preset` lacks on this machine
    (a dry run prints them as warnings)."""
    if preset.accelerator != "cuda":
        return []
    if not devices:
        return [
            f"preset {preset.name} needs CUDA, but this machine has no CUDA device "
            "(torch.cuda.is_available() is False): use --preset cpu or launch on a GPU node"
        ]
    if gpus_per_node > len(devices):
        return [
            f"--gpus {gpus_per_node} but this machine has {len(devices)} CUDA device(s) "
            f"({devices[0].name}): lower --gpus to {len(devices)}"
        ]
    return []
