"""The memory model: S(theta), the paper's formula, the component rows, DeepSpeed's estimators."""

from __future__ import annotations

import json

import pytest
import torch

from maml_ds.config import ConfigError
from maml_ds.memory import (
    COMPONENTS,
    GB,
    MemorySetup,
    build_report,
    count_activation_bytes,
    deepspeed_estimate,
    load_model_config,
    model_facts,
    paper_bytes,
)
from maml_ds.models import GPT2_FAMILY


@pytest.fixture(scope="module")
def medium():
    return model_facts("gpt2-medium")


def rows(report):
    return {r.key: r.bytes for r in report.rows}


def test_gpt2_medium_size(medium):
    assert medium.num_params == 354_823_168  # the paper's "355 million"
    assert medium.num_params == GPT2_FAMILY["gpt2-medium"].num_parameters
    assert round(medium.s_theta("fp32") / GB, 2) == 1.42
    assert round(medium.s_theta("fp16") / GB, 2) == 0.71
    # DeepSpeed's ZeRO-3 "largest layer": the (tied) token embedding
    assert medium.largest_layer_params == 50257 * 1024


@pytest.mark.parametrize("name", list(GPT2_FAMILY))
def test_family_counts_match_architecture_formula(name):
    assert model_facts(name).num_params == GPT2_FAMILY[name].num_parameters


def test_paper_formula(medium):
    s = medium.s_theta("fp32")
    assert paper_bytes(medium, MemorySetup(method="metaicl")) == ("2*S(theta)", 2 * s)
    assert paper_bytes(medium, MemorySetup(method="maml-2-4"))[1] == 6 * s  # k = n = 4
    assert paper_bytes(medium, MemorySetup(method="maml-4-2"))[1] == 4 * s  # k = n = 2
    assert paper_bytes(medium, MemorySetup(method="fomaml-2-1"))[1] == 3 * s
    assert round(6 * s / GB, 2) == 8.52


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (2, 8), (4, 16)])
@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-xl"])
def test_metaicl_model_states_agree_with_deepspeed(name, nodes, gpus, precision, stage):
    facts = model_facts(name)
    setup = MemorySetup(
        method="metaicl", zero_stage=stage, precision=precision, num_nodes=nodes, gpus_per_node=gpus
    )
    report = build_report(facts, setup)
    ds = deepspeed_estimate(facts, setup)
    assert ds is not None and report.deepspeed_estimate_bytes == ds
    assert abs(report.model_states_bytes - ds) / ds < 0.05
    r = rows(report)
    w = nodes * gpus
    if stage == 3:
        # The one row DeepSpeed's ZeRO-3 formula leaves out (18 bytes/param/W): the 16-bit
        # gradient partition, which 0.19.8 allocates (grad_partitions_flat_buffer; measured).
        assert r["gradients"] == pytest.approx(2 * facts.num_params / w, abs=1)
        assert report.model_states_bytes + r["gradients"] == pytest.approx(
            ds + 2 * facts.num_params / w, abs=8
        )


def test_deepspeed_estimators_signatures_and_what_they_count():
    """Pin the installed estimators' formulas that the agreement test relies on."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = 1_000_000
    _, gpu2 = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=4, cpu_offload=False)
    assert gpu2 == 2 * p + 18 * p // 4  # fp16 params + (grads16, grads32, master, m, v) / W
    _, gpu3, largest = estimate_zero3_model_states_mem_needs(
        p, 1000, num_gpus_per_node=4, cpu_offload=False, cpu_offload_params=False
    )
    assert largest == 4000 and gpu3 == 4000 + 18 * p // 4


def test_no_deepspeed_estimate_where_it_has_none(medium):
    assert deepspeed_estimate(medium, MemorySetup(zero_stage=1, precision="fp16")) is None
    assert deepspeed_estimate(medium, MemorySetup(zero_stage=2, precision="fp32")) is None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_maml_rows(medium, stage):
    """The rows of maml_ds.training.maml's meta-update (docs/memory.md), sizes per rank."""
    p, w = medium.num_params, 8
    kw = dict(zero_stage=stage, precision="fp16", gpus_per_node=w)
    metaicl = build_report(medium, MemorySetup(method="metaicl", **kw))
    maml = build_report(medium, MemorySetup(method="maml-2-4", **kw))
    fomaml = build_report(medium, MemorySetup(method="fomaml-2-4", **kw))
    q, f, g = 4 * p / w, 4 * p, 2 * p  # fp32 partition, full fp32 flat, model-dtype copy
    r = rows(maml)
    assert r["moment_snapshot"] == r["moments"] == pytest.approx(8 * p / (1 if stage == 0 else w))
    assert r["inner_state"] == pytest.approx(2 * q)  # AdamW m, v after the inner steps
    assert r["adapted_copy"] == pytest.approx(q)  # ONE fp32 partition copy
    assert r["hvp_vectors"] == pytest.approx(2 * q)  # g_S, u (D u and the FD point in place)
    assert r["meta_gradient_accumulator"] == r["meta_gradient_mean"] == pytest.approx(q)
    assert r["gathered_parameters"] == r["gathered_meta_gradient"] == pytest.approx(g)
    assert r["gather_backward"] == pytest.approx(2 * f)  # fp32 gradients + their concatenation
    assert r["partition_copies"] == pytest.approx(3 * q if stage == 0 else 0)
    assert r["moment_gather"] == pytest.approx(3 * f if stage == 0 else 0)
    assert r["zero3_gathered_model"] == pytest.approx(g if stage == 3 else 0)
    assert rows(fomaml)["hvp_vectors"] == 0 and rows(fomaml)["adapted_copy"] == r["adapted_copy"]
    maml_only = {c.key for c in COMPONENTS if c.methods == ("maml",)}
    assert all(rows(metaicl)[key] == 0 for key in maml_only)
    # The model states (parameters, gradients, master, moments) are MetaICL's
    for key in ("parameters", "gradients", "fp32_master", "moments", "fp32_gradients"):
        assert r[key] == rows(metaicl)[key], key
    assert maml.predicted_peak_bytes > fomaml.predicted_peak_bytes > metaicl.predicted_peak_bytes


def test_maml_phases(medium):
    """Which rows coexist: the peak is persistent + the largest transient phase."""
    report = build_report(
        medium, MemorySetup(method="maml-2-4", zero_stage=2, precision="bf16", gpus_per_node=8)
    )
    by_key = {row.key: row for row in report.rows}
    assert by_key["moment_snapshot"].phase == "meta-update"  # taken once, lives through the step
    assert "optimizer step" in by_key["moment_snapshot"].phases
    assert "loss backward end" in by_key["meta_gradient_accumulator"].phases  # n = 4 >= 2
    assert by_key["activations"].phases == ["loss forward"]
    assert by_key["gather_backward"].phases == ["loss backward end"]
    assert "optimizer step" not in by_key["inner_state"].phases
    ph = report.phase_bytes
    assert report.predicted_peak_bytes == ph["persistent"] + max(
        v for k, v in ph.items() if k != "persistent"
    )
    assert ph[report.peak_phase] == max(v for k, v in ph.items() if k != "persistent")
    one = build_report(
        medium, MemorySetup(method="maml-2-1", zero_stage=2, precision="bf16", gpus_per_node=8)
    )
    acc = next(row for row in one.rows if row.key == "meta_gradient_accumulator")
    assert acc.phases == ["meta-gradient gather"]  # n = 1: only the task's own result


def test_memory_vs_number_of_tasks(medium):
    """Flat in n from n = 2 on; n = 1 saves only the accumulator (one fp32 partition)."""
    reports = [
        build_report(
            medium,
            MemorySetup(method=f"maml-2-{n}", zero_stage=2, precision="fp16", gpus_per_node=8),
        )
        for n in (1, 2, 4, 8)
    ]
    assert len({tuple(r.bytes for r in rep.rows) for rep in reports}) == 1  # sizes never grow
    peaks = [rep.predicted_peak_bytes for rep in reports]
    assert peaks[1] == peaks[2] == peaks[3]
    assert 0 <= peaks[1] - peaks[0] <= 4 * medium.num_params / 8  # the accumulator, Q
    curve = reports[0].vs_num_tasks
    assert [pt["maml_ds_bytes"] for pt in curve] == [peaks[0]] + [peaks[1]] * 7
    s = medium.s_theta("fp16")
    assert [pt["paper_bytes"] for pt in curve] == [(n + 2) * s for n in range(1, 9)]


# Measured per-rank peaks of one meta-update (bytes), CPU, LiveTensorBytes, measure-4x256 at seq
# 128, buckets 2e5: `maml-ds memory --measure` (1 rank) and `bench/engine_step.py` (2 ranks).
# The model reproduces them (docs/memory.md has the table); a change in the engine or in
# COMPONENTS that breaks this needs a new measurement. The maml-2-n (hvp-fd) rows at ZeRO 0-2
# were measured again after issue 11 (D_j u and the FD point in place: 2 partitions less).
# ZeRO-3 rows: the sharded path
# (maml_ds.memory.measure.measure under 1 and 2 ranks, n = 1, 2), measured 2026-12-01 again
# after issue 11 (snapshot in host memory, moments in place). At 2 ranks DeepSpeed's default
# reuse distance keeps part of the gathered model through a pass (not modelled: 3-4% here,
# docs/memory.md "The sharded path"), hence 5% for those rows.
MEASURED_CPU = {
    # (method, zero, precision, world size): measured peak bytes
    ("fomaml-2-1", 0, "fp32", 1): 228_612_788,
    ("fomaml-2-2", 0, "fp32", 1): 245_707_444,
    ("maml-2-1", 0, "fp32", 1): 262_802_104,
    ("maml-2-2", 0, "fp32", 1): 279_896_760,
    ("fomaml-2-1", 1, "bf16", 1): 179_498_268,
    ("fomaml-2-2", 1, "bf16", 1): 196_592_924,
    ("maml-2-1", 1, "bf16", 1): 213_687_584,
    ("maml-2-2", 1, "bf16", 1): 230_782_240,
    ("maml-2-1", 1, "fp32", 1): 228_612_384,
    ("maml-2-2", 1, "fp32", 1): 245_707_040,
    ("fomaml-2-1", 2, "bf16", 1): 179_498_268,
    ("fomaml-2-2", 2, "bf16", 1): 196_592_924,
    ("maml-2-1", 2, "bf16", 1): 213_687_584,
    ("maml-2-2", 2, "bf16", 1): 230_782_240,
    ("fomaml-2-1", 2, "fp32", 1): 194_423_068,
    ("fomaml-2-2", 2, "fp32", 1): 211_517_724,
    ("maml-2-1", 2, "fp32", 1): 228_612_384,
    ("maml-2-2", 2, "fp32", 1): 245_707_040,
    ("maml-2-1", 3, "bf16", 1): 141_355_929,
    ("maml-2-2", 3, "bf16", 1): 158_450_585,
    ("fomaml-2-1", 3, "fp32", 1): 154_656_293,
    ("fomaml-2-2", 3, "fp32", 1): 154_656_293,
    ("maml-2-1", 0, "fp32", 2): 194_423_480,
    ("maml-2-2", 0, "fp32", 2): 202_970_808,
    ("fomaml-2-1", 0, "fp32", 2): 177_328_820,
    ("fomaml-2-2", 0, "fp32", 2): 185_876_148,
    ("maml-2-1", 1, "bf16", 2): 128_214_304,
    ("maml-2-2", 1, "bf16", 2): 136_761_632,
    ("fomaml-2-1", 1, "bf16", 2): 111_119_644,
    ("fomaml-2-2", 1, "bf16", 2): 119_666_972,
    ("maml-2-1", 2, "bf16", 2): 128_214_304,
    ("maml-2-2", 2, "bf16", 2): 136_761_632,
    ("fomaml-2-1", 2, "bf16", 2): 111_119_644,
    ("fomaml-2-2", 2, "bf16", 2): 119_666_972,
    ("maml-2-1", 2, "fp32", 2): 143_139_104,
    ("maml-2-2", 2, "fp32", 2): 151_686_432,
    ("fomaml-2-1", 2, "fp32", 2): 126_044_444,
    ("fomaml-2-2", 2, "fp32", 2): 134_591_772,
    ("maml-2-1", 3, "bf16", 2): 80_519_589,
    ("maml-2-2", 3, "bf16", 2): 89_066_917,
    ("fomaml-2-1", 3, "bf16", 2): 68_783_013,
    ("fomaml-2-2", 3, "bf16", 2): 71_972_257,
}


@pytest.mark.parametrize("case", sorted(MEASURED_CPU))
def test_model_reproduces_cpu_measurements(case):
    from maml_ds.memory import MEASURE_BUCKET, MEASURE_MODEL

    method, stage, precision, world = case
    facts = model_facts(MEASURE_MODEL)
    setup = MemorySetup(
        method=method, zero_stage=stage, precision=precision, gpus_per_node=world, seq_len=128,
        reduce_bucket_size=MEASURE_BUCKET,
    )  # fmt: skip
    predicted = build_report(facts, setup).predicted_peak_bytes
    tolerance = 0.05 if stage == 3 and world == 2 else 0.03
    assert predicted == pytest.approx(MEASURED_CPU[case], rel=tolerance)


def test_zero_partitioning(medium):
    p, w = medium.num_params, 8

    def r(stage):
        return rows(
            build_report(medium, MemorySetup(zero_stage=stage, precision="bf16", gpus_per_node=w))
        )

    r0, r1, r2, r3 = r(0), r(1), r(2), r(3)
    assert r0["moments"] == 8 * p and r1["moments"] == r2["moments"] == r3["moments"] == 8 * p // w
    assert r1["gradients"] == 2 * p and r2["gradients"] == r3["gradients"] == 2 * p // w
    assert r2["parameters"] == 2 * p and r3["parameters"] == 2 * p // w
    assert r0["fp32_master"] == 4 * p and r1["fp32_master"] == 4 * p // w
    assert r3["zero3_working_set"] == 4 * medium.largest_layer_params
    # fp32 at ZeRO-0: the optimizer steps the parameters themselves (no master copy)
    fp32 = rows(build_report(medium, MemorySetup(zero_stage=0, precision="fp32")))
    assert fp32["fp32_master"] == fp32["fp32_gradients"] == 0


def test_component_list_is_well_formed():
    keys = [c.key for c in COMPONENTS]
    assert len(keys) == len(set(keys))
    for c in COMPONENTS:
        assert c.note and c.label


def test_any_hf_config_folder(tmp_path):
    """A non-GPT-2 config from a local folder (nothing downloaded): counted on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config.save_pretrained(tmp_path)
    facts = model_facts(str(tmp_path))
    real = LlamaForCausalLM(config)
    assert facts.num_params == sum(p.numel() for p in real.parameters())
    assert (facts.num_layers, facts.hidden_size, facts.max_positions) == (2, 64, 256)
    report = build_report(facts, MemorySetup(seq_len=128))
    assert report.predicted_peak_bytes > report.model_states_bytes > 0


def test_tiny_builtin_vocab():
    assert model_facts("tiny").vocab_size == 2048
    assert model_facts("tiny", vocab_size=500).vocab_size == 500  # the tokenizer's, as built


def test_errors(medium, tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'gpt5'.*nothing is downloaded"):
        model_facts("gpt5")
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model_config(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown method"):
        MemorySetup(method="reptile").validate()
    with pytest.raises(ConfigError, match="exceeds the model's 1024 positions"):
        build_report(medium, MemorySetup(seq_len=2048))
    with pytest.raises(ConfigError, match="covers hvp-fd and first-order"):
        MemorySetup(method="maml-2-1", second_order="exact").validate()
    with pytest.raises(ConfigError) as err:
        MemorySetup(zero_stage=4, precision="fp8", gpus_per_node=0).validate()
    assert len(err.value.problems) == 3


def test_activation_count_matches_a_real_forward():
    """The meta-device count equals the bytes a real CPU forward keeps alive for backward."""
    from maml_ds.memory import all_token_loss
    from maml_ds.meta.live_bytes import LiveTensorBytes
    from maml_ds.models import model_from_config

    config = load_model_config("tiny", vocab_size=512)
    predicted = count_activation_bytes(
        config, seq_len=48, micro_batch_size=2, precision="fp32", attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = model_from_config(config, attn_implementation="eager", seed=0)
    ids = torch.randint(0, 512, (2, 48))
    with LiveTensorBytes() as mem:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = all_token_loss(logits, ids)
        alive = mem.current_bytes  # graph (saved tensors) + logits + the scalar loss
    del loss, logits
    assert abs(alive - predicted) / predicted < 0.05


def test_report_is_json(medium):
    report = build_report(
        medium, MemorySetup(method="maml-2-4", zero_stage=2, precision="fp16", gpus_per_node=8)
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["model"]["num_params"] == medium.num_params
    assert data["setup"]["world_size"] == 8
    assert {r["key"] for r in data["rows"]} == {c.key for c in COMPONENTS}


def test_measure_model_is_a_builtin():
    """The model --measure runs comes from the one registry (maml_ds.models), built as training
    builds it; the meta-device count equals the real model's."""
    from maml_ds.memory import MEASURE_MODEL
    from maml_ds.models import build_model

    facts = model_facts(MEASURE_MODEL)
    assert facts.num_params == 4_273_664  # docs/memory.md
    real = build_model(MEASURE_MODEL, vocab_size=512)  # the fixture's tokenizer: vocab stays 4096
    assert real.config.vocab_size == facts.vocab_size == 4096
    assert sum(p.numel() for p in real.parameters()) == facts.num_params


# hvp-fd with k = 2 and 4 inner steps and c kept support gradients (None: k - 1), measured like
# MEASURED_CPU (seq 128, fp32, 1 rank; `measure` with MemorySetup(keep_support_gradients=c)).
# Gather path: each kept gradient is a device partition (c = 0 -> 1: +1 partition exactly); at
# k = 4 the three kept add 1.4 partitions, not 2 (the peak moves to the last FD pass): the model
# over-predicts that row by 6%. Sharded path: kept in host memory, the peak the same for every c;
# the model over-predicts k >= 2 there by 7% (its k = 2 row counts half a partition too many).
MEASURED_KEPT = {
    # (method, zero, kept): (measured peak bytes, relative tolerance)
    ("maml-4-1", 2, 0): (245_711_396, 0.03),
    ("maml-4-1", 2, 1): (262_806_052, 0.03),
    ("maml-8-1", 2, 0): (256_437_288, 0.03),
    ("maml-8-1", 2, 1): (273_531_944, 0.03),
    ("maml-8-1", 2, None): (297_004_084, 0.07),
    ("maml-4-1", 3, 0): (223_039_265, 0.08),
    ("maml-4-1", 3, None): (223_039_265, 0.08),
    ("maml-8-1", 3, 0): (240_142_633, 0.08),
    ("maml-8-1", 3, None): (240_142_633, 0.08),
}


@pytest.mark.parametrize("case", sorted(MEASURED_KEPT, key=str))
def test_model_reproduces_kept_support_gradients(case):
    from maml_ds.memory import MEASURE_BUCKET, MEASURE_MODEL
    from maml_ds.memory.model import host_bytes

    method, stage, kept = case
    measured, tolerance = MEASURED_KEPT[case]
    setup = MemorySetup(
        method=method, zero_stage=stage, precision="fp32", seq_len=128,
        reduce_bucket_size=MEASURE_BUCKET, keep_support_gradients=kept,
    )  # fmt: skip
    facts = model_facts(MEASURE_MODEL)
    predicted = build_report(facts, setup).predicted_peak_bytes
    assert predicted == pytest.approx(measured, rel=tolerance)
    q = 4 * facts.num_params  # one fp32 partition at 1 rank
    assert host_bytes(facts, setup) == (
        (2 + setup.kept_support_gradients) * q if stage == 3 else 0
    )  # the sharded path's pinned snapshot and kept gradients


# --adapted-rounding stochastic, bf16, 1 rank, seq 128 (measured like MEASURED_CPU): the gather
# path holds the rounded partition through each pass (+Q exactly), the sharded path nothing.
MEASURED_STOCHASTIC = {
    # (method, zero): (nearest, stochastic) measured peak bytes
    ("maml-2-1", 1): (213_687_584, 230_782_232),
    ("maml-2-1", 2): (213_687_584, 230_782_232),
    ("maml-4-1", 2): (247_881_252, 264_975_900),
    ("maml-2-1", 3): (141_355_929, 141_355_929),
}


@pytest.mark.parametrize("case", sorted(MEASURED_STOCHASTIC))
def test_model_counts_the_stochastically_rounded_point(case):
    from maml_ds.memory import MEASURE_BUCKET, MEASURE_MODEL

    method, stage = case
    facts = model_facts(MEASURE_MODEL)
    for rounding, measured in zip(
        ("nearest", "stochastic"), MEASURED_STOCHASTIC[case], strict=True
    ):
        setup = MemorySetup(
            method=method, zero_stage=stage, precision="bf16", seq_len=128,
            reduce_bucket_size=MEASURE_BUCKET, adapted_rounding=rounding,
        )  # fmt: skip
        predicted = build_report(facts, setup).predicted_peak_bytes
        assert predicted == pytest.approx(measured, rel=0.03), rounding
