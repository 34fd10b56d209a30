"""MetaICL-format data: settings and task configs (tasks), task files (reader), prompts, and
real data in that format: your own tasks (importer), MetaICL's (registry), checks (check)."""

from maml_ds.data.check import CheckReport, check_setting
from maml_ds.data.importer import ImportSummary, TaskRecipe, import_task, load_source
from maml_ds.data.prompts import (
    EncodedPrompt,
    PromptFormat,
    build_option_prompts,
    build_prompt,
    build_training_prompt,
    collate,
    encode_demonstrations,
    encode_example,
    encode_target,
    has_no_label,
    join_prompt,
)
from maml_ds.data.reader import (
    META_TRAIN_K,
    META_TRAIN_SEED,
    TEST_SEEDS,
    Example,
    find_meta_train_file,
    load_examples,
    load_meta_train_examples,
    load_target_examples,
    task_file,
)
from maml_ds.data.registry import REGISTRY, RegistryEntry, build_tasks
from maml_ds.data.tasks import (
    DataError,
    Setting,
    TaskConfig,
    available_settings,
    load_setting,
    load_task_config,
)

__all__ = [
    "META_TRAIN_K",
    "META_TRAIN_SEED",
    "REGISTRY",
    "TEST_SEEDS",
    "CheckReport",
    "DataError",
    "EncodedPrompt",
    "Example",
    "ImportSummary",
    "PromptFormat",
    "RegistryEntry",
    "Setting",
    "TaskConfig",
    "TaskRecipe",
    "available_settings",
    "build_option_prompts",
    "build_prompt",
    "build_tasks",
    "build_training_prompt",
    "check_setting",
    "collate",
    "encode_demonstrations",
    "encode_example",
    "encode_target",
    "find_meta_train_file",
    "has_no_label",
    "import_task",
    "join_prompt",
    "load_examples",
    "load_meta_train_examples",
    "load_setting",
    "load_source",
    "load_target_examples",
    "load_task_config",
    "task_file",
]
