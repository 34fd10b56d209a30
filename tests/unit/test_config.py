"""The typed config: method strings, validation into one error, the DeepSpeed JSON."""

from __future__ import annotations

import pytest

from maml_ds.config import ConfigError, MetaConfig, RunConfig, parse_method
from maml_ds.deepspeed_json import build_deepspeed_config, check_batch_arithmetic


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
    assert "stage3_max_reuse_distance" not in ds["zero_optimization"]  # DeepSpeed's own
    # MAML's sharded path releases each gathered layer after use (docs/memory.md)
    maml = RunConfig(method="maml-2-4")
    maml.deepspeed.zero_stage = 3
    zero = build_deepspeed_config(maml, world_size=8)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == 0 and zero["stage3_max_live_parameters"] == 0
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


# --------------------------------------------------------------------------------------------
# --deepspeed-config: a user's DeepSpeed JSON merged over the built one
# --------------------------------------------------------------------------------------------


def user_json(tmp_path, data) -> str:
    import json

    path = tmp_path / "user.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_user_deepspeed_json_is_merged_key_by_key(tmp_path):
    cfg = RunConfig(method="maml-2-2")
    cfg.deepspeed.zero_stage = 2
    built = build_deepspeed_config(cfg, 2)
    cfg.deepspeed.config_file = user_json(
        tmp_path,
        {
            "tensorboard": {"enabled": True, "output_path": "/tb", "job_name": "mine"},
            "csv_monitor": {"output_path": "/csv"},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "zero_force_ds_cpu_optimizer": False,
            "train_batch_size": built["train_batch_size"],  # repeating a maml-ds value is fine
            "comms_logger": {"enabled": True},
        },
    )
    ds = build_deepspeed_config(cfg, 2)
    assert ds["tensorboard"] == {"enabled": True, "output_path": "/tb", "job_name": "mine"}
    assert ds["csv_monitor"] == {**built["csv_monitor"], "output_path": "/csv"}  # user wins
    zero = ds["zero_optimization"]
    assert zero == {**built["zero_optimization"], "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["comms_logger"] == {"enabled": True}
    for key in ("train_batch_size", "gradient_clipping", "gradient_accumulation_steps"):
        assert ds[key] == built[key]


def test_user_deepspeed_json_contradictions_are_one_error_naming_both(tmp_path):
    cfg = RunConfig(method="metaicl")
    cfg.deepspeed.config_file = user_json(
        tmp_path,
        {
            "train_batch_size": 64,
            "train_micro_batch_size_per_gpu": 8,
            "gradient_clipping": 0.3,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
            "scheduler": {"type": "WarmupLR"},
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": True},
        },
    )
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(cfg, 2)
    text = " ".join(str(err.value).split())
    assert "7 problem(s)" in text
    for fragment in (
        "sets train_batch_size = 64 but maml-ds's config has 2",
        "sets train_micro_batch_size_per_gpu = 8 but maml-ds's config has 1 (--micro-batch-size)",
        "sets gradient_clipping = 0.3 but maml-ds's config has 1.0 (--gradient-clipping)",
        "sets `optimizer`, but maml-ds passes its own optimizer (SharedMomentAdamW",
        "sets `scheduler`, but maml-ds passes its own LR schedule (--schedule, --warmup-steps)",
        "sets zero_optimization.stage = 3 but maml-ds runs --zero 0",
        "sets bf16.enabled = true but maml-ds runs --precision fp32",
        "or pass --precision bf16",
    ):
        assert fragment in text
    cfg.deepspeed.precision = "fp16"
    cfg.deepspeed.config_file = user_json(tmp_path, {"fp16": {"enabled": False}})
    with pytest.raises(ConfigError, match="fp16.enabled = false but maml-ds runs --precision fp16"):
        build_deepspeed_config(cfg, 1)
    cfg.deepspeed.config_file = user_json(tmp_path, {"fp16": {"loss_scale": 128}})
    assert build_deepspeed_config(cfg, 1)["fp16"]["loss_scale"] == 128  # a tunable: user wins


def test_user_deepspeed_json_must_exist_and_be_an_object(tmp_path):
    cfg = RunConfig()
    cfg.deepspeed.config_file = str(tmp_path / "missing.json")
    assert f"--deepspeed-config {tmp_path / 'missing.json'} does not exist" in cfg.problems()
    (tmp_path / "list.json").write_text("[1, 2]")
    cfg.deepspeed.config_file = str(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        build_deepspeed_config(cfg, 1)
    (tmp_path / "bad.json").write_text("{nope")
    cfg.deepspeed.config_file = str(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_deepspeed_config(cfg, 1)


def test_log_every_is_checked():
    assert "--log-every must be >= 1, got 0" in RunConfig(log_every=0).problems()


def test_stochastic_rounding_with_fresh_inner_moments_is_refused():
    """The measured bad case (docs/memory.md): second-order MAML, AdamW inner steps on fresh
    moments, 16 bits; first order, shared moments and fp32 are accepted."""

    def problems(**meta):
        cfg = RunConfig(method=meta.pop("method", "maml-2-1"))
        cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 3, meta.pop("precision", "bf16")
        cfg.meta.adapted_rounding = "stochastic"
        for key, value in meta.items():
            setattr(cfg.meta, key, value)
        return [p for p in cfg.problems() if "--adapted-rounding" in p]

    refused = problems(shared_moments=False)
    assert len(refused) == 1 and "--no-shared-moments" in refused[0]
    assert problems() == []
    assert problems(shared_moments=False, method="fomaml-2-1") == []
    assert problems(shared_moments=False, precision="fp32") == []
    assert problems(shared_moments=False, inner_optimizer="sgd") == []
    bad = RunConfig(meta=MetaConfig(adapted_rounding="x")).problems()  # type: ignore[arg-type]
    assert "--adapted-rounding must be nearest or stochastic, got 'x'" in bad
