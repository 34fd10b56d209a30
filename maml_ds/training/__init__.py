"""Meta-training on DeepSpeed: ``setup -> fit -> export`` (loop), the MetaICL and MAML updates,
checkpoints, and the one adapter over DeepSpeed internals (zero_layout). docs/engine.md."""

from maml_ds.training import checkpoint
from maml_ds.training.loop import (
    CHECKPOINTS,
    CONFIG_FILE,
    build_optimizer,
    export_model,
    fit,
    load_training_tasks,
    save_checkpoint,
    setup,
    step_function,
    train,
)
from maml_ds.training.state import StepStats, TrainContext, TrainState

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "StepStats",
    "TrainContext",
    "TrainState",
    "build_optimizer",
    "checkpoint",
    "export_model",
    "fit",
    "load_training_tasks",
    "save_checkpoint",
    "setup",
    "step_function",
    "train",
]
