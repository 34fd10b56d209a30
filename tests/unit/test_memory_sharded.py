"""The memory model of the sharded ZeRO-3 path (maml_ds/training/sharded.py): no full-size row,
MAML's extra over MetaICL partitioned, the CPU measurements reproduced (no engine run here)."""

from __future__ import annotations

import pytest

from maml_ds.memory import MemorySetup, build_report, model_facts
from maml_ds.memory.model import sharded_path

GATHER_ROWS = (
    "gathered_parameters", "gather_transient", "gather_backward", "gathered_meta_gradient",
    "zero3_gathered_model",
)  # fmt: skip

# LiveTensorBytes per rank, one update after a warm-up, measure-4x256 at seq 32, fp32, ZeRO-3,
# buckets of 20,000 elements (tests/engine/sharded_worker.py kind=memory; "release": DeepSpeed
# releases each layer after use, RELEASE_EACH_LAYER; otherwise its default reuse distance).
MEASURED_SEQ_32 = {
    ("metaicl", 1, "release"): 136_837_833,
    ("metaicl", 2, "release"): 68_459_209,
    ("maml-2-4", 1, "release"): 273_595_621,
    ("maml-2-4", 2, "release"): 146_696_429,
    ("metaicl", 1, "default"): 136_837_833,
    ("metaicl", 2, "default"): 69_319_617,
    ("maml-2-4", 1, "default"): 273_595_621,
    ("maml-2-4", 2, "default"): 154_793_453,
    ("fomaml-2-4", 1, "default"): 222_311_641,
    ("fomaml-2-4", 2, "default"): 120_604_137,
}


def seq_32(method: str, world: int) -> int:
    setup = MemorySetup(
        method=method, zero_stage=3, precision="fp32", gpus_per_node=world, seq_len=32,
        reduce_bucket_size=20_000,
    )  # fmt: skip
    return build_report(model_facts("measure-4x256"), setup).predicted_peak_bytes


@pytest.mark.parametrize("case", sorted(MEASURED_SEQ_32))
def test_model_predicts_the_sharded_measurements(case):
    method, world, _ = case
    assert seq_32(method, world) == pytest.approx(MEASURED_SEQ_32[case], rel=0.15)


def test_maml_extra_over_metaicl_is_partitioned():
    for release in ("release", "default"):
        measured = {
            w: MEASURED_SEQ_32["maml-2-4", w, release] - MEASURED_SEQ_32["metaicl", w, release]
            for w in (1, 2)
        }
        assert measured[2] <= (0.6 if release == "release" else 0.63) * measured[1]
    predicted = {w: seq_32("maml-2-4", w) - seq_32("metaicl", w) for w in (1, 2)}
    assert predicted[2] <= 0.6 * predicted[1]


UNPARTITIONED = ("activations", "zero3_working_set", "reduce_bucket")
"""Rows of one pass that do not shrink with the world size (MetaICL has them too)."""


@pytest.mark.parametrize("method", ["maml-2-4", "fomaml-2-4", "maml-4-2"])
def test_sharded_path_holds_nothing_full_size(method):
    facts = model_facts("random:gpt2-xl")

    def rows(world: int) -> dict[str, int]:
        setup = MemorySetup(method=method, zero_stage=3, precision="bf16", gpus_per_node=world)
        assert sharded_path(setup)
        return {r.key: r.bytes for r in build_report(facts, setup).rows}

    eight, sixteen = rows(8), rows(16)
    assert all(eight[key] == 0 for key in GATHER_ROWS)
    for key, size in eight.items():  # everything else is a partition: half on twice the GPUs
        if key not in UNPARTITIONED:
            assert sixteen[key] == pytest.approx(size / 2, rel=1e-6, abs=1), key
    assert eight["pass_gradient"] == pytest.approx(4 * facts.num_params / 8, rel=1e-6)


def test_gather_path_where_the_sharded_one_does_not_apply():
    for setup in (
        MemorySetup(method="maml-2-4", zero_stage=3, precision="fp16", gpus_per_node=8),
        MemorySetup(method="maml-2-4", zero_stage=2, precision="bf16", gpus_per_node=8),
    ):
        assert not sharded_path(setup)
        rows = {r.key: r.bytes for r in build_report(model_facts("gpt2"), setup).rows}
        assert rows["gather_backward"] > 0 and rows["pass_gradient"] == 0
