"""`maml-ds export RUN_OR_CHECKPOINT OUT_DIR`: a Hugging Face folder of the fp32 master weights.

The checkpoint is read by `maml_ds.model_io.load_model` (DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint`: ZeRO-3 shards consolidated); the folder is written
by `maml_ds.training.export.save_hf_folder`, as `RUN/final` is. docs/export.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from launcher.errors import err_console as console
from launcher.errors import fail
from maml_ds.config import ConfigError
from maml_ds.training.export import ExportDtype


def export_command(
    source: Annotated[
        Path, typer.Argument(help="a run folder, RUN/checkpoints or RUN/checkpoints/stepN")
    ],
    out_dir: Annotated[Path, typer.Argument(help="the Hugging Face folder to write (new)")],
    dtype: Annotated[
        ExportDtype, typer.Option(help="dtype of the saved weights (cast from the fp32 master)")
    ] = "fp32",
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer to save (default: the run's own)")
    ] = None,
) -> None:
    """Export a run's checkpoint (the optimizer's fp32 master weights) as a Hugging Face folder.

    Example: maml-ds export runs/maml-2-4 models/maml-2-4 --dtype bf16
    """
    from maml_ds.model_io import load_model
    from maml_ds.training import CHECKPOINTS
    from maml_ds.training.export import save_hf_folder
    from maml_ds.training.zero_layout import checkpoint_client_state

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise fail(f"{out_dir} already exists and is not empty: choose a new OUT_DIR")
    checkpoints = source / CHECKPOINTS
    where = checkpoints if (source / "config.json").is_file() and checkpoints.is_dir() else source
    try:
        loaded = load_model(where, tokenizer=tokenizer, device="cpu")
    except ConfigError as err:
        raise fail(str(err)) from None
    if loaded.source not in ("run-checkpoint", "checkpoint"):
        raise fail(
            f"{source} is not a maml-ds run with checkpoints nor a DeepSpeed checkpoint "
            f"(it resolved to a {loaded.source}); export reads checkpoints"
        )
    tag_dir = Path(loaded.path)
    client = checkpoint_client_state(tag_dir) or {}
    cfg = loaded.run_config
    note = {
        "run_dir": str(loaded.run_dir.resolve()) if loaded.run_dir else None,
        "source": str(tag_dir.resolve()),
        "step": client.get("train_state", {}).get("step"),
        "method": cfg.method if cfg else None,
        "zero_stage": cfg.deepspeed.zero_stage if cfg else None,
        "precision": cfg.deepspeed.precision if cfg else None,
        "weights": "fp32 master of the optimizer (DeepSpeed checkpoint)",
    }
    save_hf_folder(loaded.model, loaded.tokenizer, out_dir, dtype=dtype, note=note)
    console.print(
        f"exported {tag_dir} (step {note['step']}) to {out_dir} as {dtype}",
        highlight=False,
        soft_wrap=True,
    )
