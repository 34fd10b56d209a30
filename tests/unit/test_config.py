"""The typed config: method strings, validation into one error, the DeepSpeed JSON."""

from __future__ import annotations

import pytest

from maml_ds.config import (
    ConfigError,
    RunConfig,
    build_deepspeed_config,
    check_batch_arithmetic,
    parse_method,
)


@pytest.mark.parametrize(
    "text, kind, k, n, first_order, batches",
    [
        ("metaicl", "metaicl", 0, 1, False, 1),
        ("maml-2-1", "maml", 1, 1, False, 2),
        ("maml-2-4", "maml", 1, 4, False, 8),
        ("MAML-4-2", "maml", 2, 2, False, 8),
        ("fomaml-2-4", "maml", 1, 4, True, 8),
    ],
)
def test_parse_method(text, kind, k, n, first_order, batches):
    spec = parse_method(text)
    assert (spec.kind, spec.num_inner_steps, spec.num_tasks, spec.first_order) == (
        kind,
        k,
        n,
        first_order,
    )
    assert spec.batches_per_update == batches


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("reptile", "unknown method 'reptile'; valid forms: 'metaicl'"),
        ("maml-3-4", "must be an even number >= 2 (k >= 1), got 3"),
        ("maml-0-4", "must be an even number >= 2 (k >= 1), got 0"),
        ("maml-2-0", "n (tasks per meta-update) must be >= 1, got 0"),
        ("maml-2", "unknown method 'maml-2'"),
    ],
)
def test_parse_method_errors(text, fragment):
    with pytest.raises(ConfigError) as err:
        parse_method(text)
    assert fragment in str(err.value)


def test_validate_collects_every_problem_with_its_flag():
    cfg = RunConfig(method="maml-2-4", max_steps=0)
    cfg.deepspeed.zero_stage = 3
    cfg.meta.second_order = "exact"
    cfg.deepspeed.micro_batch_size = 0
    cfg.data.train_fraction = 1.5
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert "4 problem(s)" in text
    for fragment in (
        "--max-steps must be >= 1",
        "--second-order exact needs double backward, which ZeRO-3",
        "use --second-order hvp-fd",
        "--micro-batch-size must be >= 1",
        "--train-fraction must be in (0, 1]",
    ):
        assert fragment in text


def test_zero3_hvp_fd_and_first_order_are_valid():
    for method, mode in (("maml-2-2", "hvp-fd"), ("fomaml-2-2", "exact")):
        cfg = RunConfig(method=method)
        cfg.deepspeed.zero_stage = 3
        cfg.meta.second_order = mode
        cfg.validate()


def test_gradient_clipping_defaults_per_method_and_is_always_explicit():
    assert build_deepspeed_config(RunConfig(method="metaicl"), 1)["gradient_clipping"] == 1.0
    assert build_deepspeed_config(RunConfig(method="maml-2-1"), 1)["gradient_clipping"] == 0.0
    cfg = RunConfig(method="maml-2-1")
    cfg.optim.gradient_clipping = 0.5
    assert build_deepspeed_config(cfg, 1)["gradient_clipping"] == 0.5


def test_deepspeed_json_batch_arithmetic_and_stages():
    cfg = RunConfig(method="metaicl")
    cfg.deepspeed.micro_batch_size = 2
    cfg.deepspeed.gradient_accumulation_steps = 3
    cfg.deepspeed.zero_stage = 3
    cfg.deepspeed.precision = "fp16"
    ds = build_deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 2 * 3 * 8
    assert ds["zero_optimization"]["stage"] == 3
    assert "stage3_param_persistence_threshold" in ds["zero_optimization"]
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["zero_allow_untested_optimizer"] is True
    # MAML: one backward + one step per meta-update; the engine accumulates the n tasks.
    cfg = RunConfig(method="maml-2-4")
    cfg.deepspeed.precision = "bf16"
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 4
    assert ds["bf16"] == {"enabled": True}
    with pytest.raises(ConfigError, match="batch arithmetic"):
        check_batch_arithmetic(dict(ds, train_batch_size=5), world_size=4)


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = RunConfig(method="maml-2-4", max_steps=7)
    cfg.optim.betas = (0.8, 0.99)
    cfg.save(tmp_path / "c.json")
    again = RunConfig.load(tmp_path / "c.json")
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.json")
