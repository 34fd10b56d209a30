"""Per-GPU memory of MetaICL and MAML-en-LLM: the component model (model), the report beside
the paper's formula (report), meta-device facts (facts) and real measurements (measure).
docs/memory.md."""

from maml_ds.memory.facts import (
    DTYPE_BYTES,
    ModelFacts,
    all_token_loss,
    count_activation_bytes,
    load_model_config,
    model_facts,
)
from maml_ds.memory.measure import (
    MEASURE_BUCKET,
    MEASURE_SEQ_LEN,
    MeasureFixture,
    MeasurementUnavailable,
    UpdateMeasurement,
    measure,
    measure_run_config,
    measure_update_peak,
    measure_updates,
)
from maml_ds.memory.model import COMPONENTS, GB, PHASES, Component, MemorySetup
from maml_ds.memory.report import (
    MemoryReport,
    Row,
    build_report,
    deepspeed_estimate,
    engine_refusal,
    memory_report,
    paper_bytes,
    with_num_tasks,
)
from maml_ds.models import MEASURE_MODEL

__all__ = [
    "COMPONENTS",
    "DTYPE_BYTES",
    "GB",
    "MEASURE_BUCKET",
    "MEASURE_MODEL",
    "MEASURE_SEQ_LEN",
    "PHASES",
    "Component",
    "MeasureFixture",
    "MeasurementUnavailable",
    "MemoryReport",
    "MemorySetup",
    "ModelFacts",
    "Row",
    "UpdateMeasurement",
    "all_token_loss",
    "build_report",
    "count_activation_bytes",
    "deepspeed_estimate",
    "engine_refusal",
    "load_model_config",
    "measure",
    "measure_run_config",
    "measure_update_peak",
    "measure_updates",
    "memory_report",
    "model_facts",
    "paper_bytes",
    "with_num_tasks",
]
