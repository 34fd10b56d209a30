"""The memory model of the sharded ZeRO-3 path (maml_ds/training/sharded.py): no full-size row,
MAML's extra over MetaICL partitioned, the CPU measurements reproduced (no engine run here)."""

from __future__ import annotations

import pytest

from maml_ds.memory import MemorySetup, build_report, model_facts
from maml_ds.memory.model import sharded_path
from tests.engine.sharded_worker import model_folder

GATHER_ROWS = (
    "gathered_parameters", "gather_transient", "gather_backward", "gathered_meta_gradient",
    "zero3_gathered_model",
)  # fmt: skip

# LiveTensorBytes per rank, one update after a warm-up, at seq 32, fp32, ZeRO-3, buckets of
# 20,000 elements (tests/engine/sharded_worker.py kind=memory; "release": DeepSpeed releases each
# layer after use, RELEASE_EACH_LAYER; otherwise its default reuse distance), with the engine
# of this writing (moment snapshot in host memory, inner moments stepped in place, D_j u and the
# FD point in place). Keys: (model, method, ranks, release).
MEASURED_SEQ_32 = {
    ("measure-4x256", "metaicl", 1, "release"): 136_837_833,
    ("measure-4x256", "metaicl", 2, "release"): 68_459_209,
    ("measure-4x256", "maml-2-4", 1, "release"): 171_027_677,
    ("measure-4x256", "maml-2-4", 2, "release"): 95_412_453,
    ("measure-4x256", "metaicl", 1, "default"): 136_837_833,
    ("measure-4x256", "metaicl", 2, "default"): 69_319_617,
    ("measure-4x256", "maml-2-4", 1, "default"): 171_027_677,
    ("measure-4x256", "maml-2-4", 2, "default"): 103_509_477,
    ("measure-4x256", "fomaml-2-4", 1, "default"): 153_933_029,
    ("measure-4x256", "fomaml-2-4", 2, "default"): 86_414_817,
    ("deep-12x256", "metaicl", 1, "release"): 309_656_265,
    ("deep-12x256", "metaicl", 2, "release"): 154_868_425,
    ("deep-12x256", "maml-2-4", 1, "release"): 387_050_717,
    ("deep-12x256", "maml-2-4", 2, "release"): 197_135_581,
    ("deep-12x256", "metaicl", 1, "default"): 309_656_265,
    ("deep-12x256", "metaicl", 2, "default"): 154_868_425,
    ("deep-12x256", "maml-2-4", 1, "default"): 387_050_717,
    ("deep-12x256", "maml-2-4", 2, "default"): 226_651_621,
    ("deep-12x256", "fomaml-2-4", 1, "default"): 348_353_765,
    ("deep-12x256", "fomaml-2-4", 2, "default"): 187_954_657,
}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    deep = model_folder("deep-12x256", tmp_path_factory.mktemp("deep"))
    return {"measure-4x256": model_facts("measure-4x256"), "deep-12x256": model_facts(deep)}


def seq_32(facts, model: str, method: str, world: int) -> int:
    setup = MemorySetup(
        method=method, zero_stage=3, precision="fp32", gpus_per_node=world, seq_len=32,
        reduce_bucket_size=20_000,
    )  # fmt: skip
    return build_report(facts[model], setup).predicted_peak_bytes


@pytest.mark.parametrize("case", sorted(MEASURED_SEQ_32))
def test_model_predicts_the_sharded_measurements(facts, case):
    model, method, world, _ = case
    assert seq_32(facts, model, method, world) == pytest.approx(MEASURED_SEQ_32[case], rel=0.15)


def extra(model: str, release: str, world: int) -> int:
    return (
        MEASURED_SEQ_32[model, "maml-2-4", world, release]
        - MEASURED_SEQ_32[model, "metaicl", world, release]
    )


def test_maml_extra_over_metaicl_is_partitioned(facts):
    """deep-12x256 with per-layer release: 0.546 measured, 0.50 predicted. Without it (0.93)
    and on measure-4x256 (0.79: its embedding, gathered in every pass, is a quarter of the
    parameters) what does not partition outweighs MAML's two extra partitions."""
    assert extra("deep-12x256", "release", 2) <= 0.6 * extra("deep-12x256", "release", 1)
    assert extra("deep-12x256", "default", 2) > 0.6 * extra("deep-12x256", "default", 1)
    predicted = {
        w: seq_32(facts, "deep-12x256", "maml-2-4", w) - seq_32(facts, "deep-12x256", "metaicl", w)
        for w in (1, 2)
    }
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


def test_gpt2_xl_report_meets_the_targets():
    """gpt2-xl maml-2-4, 8 GPUs, ZeRO-3, bf16, seq 1024 (issue 11): <= 1.25x MetaICL without
    activation checkpointing (1.19 predicted), <= 2x with it (1.36); 1.47 and 2.21 before the
    snapshot went to host memory and the moments, D_j u and the FD point were kept in place."""
    facts = model_facts("random:gpt2-xl")

    def peak(method: str, checkpointing: bool) -> int:
        setup = MemorySetup(
            method=method, zero_stage=3, precision="bf16", gpus_per_node=8,
            activation_checkpointing=checkpointing,
        )  # fmt: skip
        return build_report(facts, setup).predicted_peak_bytes

    assert peak("maml-2-4", False) <= 1.25 * peak("metaicl", False)
    assert peak("maml-2-4", True) <= 2 * peak("metaicl", True)
