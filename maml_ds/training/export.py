"""Hugging Face folders of the fp32 master weights, from a live engine or from a checkpoint.

At ZeRO 1-3 with fp16/bf16 the module holds 16-bit copies; what the optimizer trained is the
fp32 master (partitioned across ranks). Both paths export that: the engine through DeepSpeed's
public `safe_get_full_fp32_param` (a collective: every rank calls `export_engine`), a checkpoint
through `get_fp32_state_dict_from_zero_checkpoint`. `config.json` records the saved dtype, so
`from_pretrained` loads what was written. docs/export.md.
"""

from __future__ import annotations

import copy
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import torch
from deepspeed.utils import safe_get_full_fp32_param

from maml_ds import distributed as D
from maml_ds.files import write_atomic
from maml_ds.training.state import TrainContext

__all__ = ["DTYPES", "EXPORT_NOTE", "ExportDtype", "export_engine", "save_hf_folder"]

ExportDtype = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
EXPORT_NOTE = "maml_ds_export.json"
"""Beside the weights: the run, checkpoint and step they came from, and how they were cast."""


def save_hf_folder(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    *,
    dtype: ExportDtype = "fp32",
    note: dict[str, Any],
) -> Path:
    """`model` (full fp32 weights, on CPU; cast in place) + tokenizer + the note, in `path`."""
    path = Path(path)
    model.to(DTYPES[dtype])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    note = {
        **note,
        "dtype": dtype,
        "maml_ds": version("maml-ds"),
        "deepspeed": version("deepspeed"),
    }
    write_atomic(path / EXPORT_NOTE, json.dumps(note, indent=2, sort_keys=True) + "\n")
    return path


def fp32_master_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master (full, on CPU) and every buffer; a collective.

    ZeRO-0 in fp32 has no separate master: the module's parameters are it.
    """
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (param.detach() if full is None else full).float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    return state


def export_engine(
    ctx: TrainContext,
    path: str | Path,
    *,
    dtype: ExportDtype = "fp32",
    source: str = "engine (end of training)",
) -> Path:
    """The engine's fp32 master as a Hugging Face folder (called on every rank; rank 0 writes)."""
    path = Path(path)
    state = fp32_master_state(ctx.engine)
    if D.is_main():
        module = ctx.engine.module
        with torch.device("meta"):
            model = type(module)(copy.deepcopy(module.config))
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise RuntimeError(f"export: no weights for {left[:5]} (not in the engine's module)")
        ds = ctx.cfg.deepspeed
        note = {
            "run_dir": str(Path(ctx.out_dir).resolve()),
            "source": source,
            "step": ctx.state.step,
            "method": ctx.cfg.method,
            "zero_stage": ds.zero_stage,
            "precision": ds.precision,
            "weights": "fp32 master of the optimizer",
        }
        save_hf_folder(model, ctx.tokenizer, path, dtype=dtype, note=note)
    D.barrier()
    return path
