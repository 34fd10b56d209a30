"""What `--resume` may change (maml_ds/training/run_record.py), on fabricated run folders: one
refused or applied change per RunConfig field, the world size, the reference config, the LR
schedule rebuilt after a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maml_ds.config import RunConfig
from maml_ds.training import checkpoint
from maml_ds.training.loop import linear_schedule
from maml_ds.training.run_record import (
    RESUME_RULES,
    WORLD_SIZE,
    ResumeRefused,
    _leaves,
    rebuild_schedule,
    resume_config,
)


def saved_config(run: Path) -> RunConfig:
    cfg = RunConfig(method="metaicl", out_dir=str(run), max_steps=4)
    cfg.data.num_demonstrations = 4
    cfg.data.tasks = "fresh"  # so that a new --copy-share alone is a valid config
    cfg.deepspeed.zero_stage = 1
    return cfg


def fake_run(run: Path, cfg: RunConfig, *, world_size: int = 1, config_json: bool = True) -> Path:
    """A run folder whose newest checkpoint is complete by its manifest (no DeepSpeed files)."""
    tag_dir = run / "checkpoints" / "step2"
    tag_dir.mkdir(parents=True)
    manifest = {"format": 1, "tag": "step2", "step": 2, "world_size": world_size,
                "config": cfg.to_dict(), "files": {}}  # fmt: skip
    (tag_dir / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    (run / "checkpoints" / checkpoint.LATEST).write_text("step2")
    if config_json:
        cfg.save(run / "config.json")
    return run


# A valid new value for every field (the saved config above: metaicl, ZeRO-1, fp32, k 4,
# fresh tasks).
NEW_VALUES = {
    "method": "maml-2-2", "out_dir": None, "max_steps": 8, "seed": 1, "save_every": 1,
    "log_every": 1, "max_consecutive_skips": 3, "deterministic": False,
    "model.name": "tiny-128", "model.tokenizer": "some/tokenizer",
    "model.attn_implementation": "sdpa", "model.activation_checkpointing": True,
    "model.dropout": 0.1,
    "data.data_dir": "data/other", "data.setting": "hr_to_lr", "data.variant": "channel",
    "data.num_demonstrations": 8, "data.max_length_per_example": 128, "data.max_length": 512,
    "data.train_fraction": 0.5, "data.max_examples_per_task": 10, "data.format": "spaces",
    "data.tasks": "files", "data.copy_share": 0.5, "data.score_demonstrations": True,
    "validate_every": 5, "copy.copy_min_length": 2, "copy.copy_max_length": 30,
    "copy.copy_max_prefix": 3, "copy.copy_position_offset": 50, "copy.copy_offset_from": 7,
    "optim.lr": 1e-3, "optim.weight_decay": 0.1, "optim.betas": (0.8, 0.9), "optim.eps": 1e-6,
    "optim.warmup_steps": 2, "optim.schedule": "constant", "optim.gradient_clipping": 0.5,
    "meta.inner_lr": 1e-3, "meta.second_order": "exact", "meta.fd_mode": "central",
    "meta.fd_scale": 1e-4, "meta.inner_optimizer": "sgd", "meta.outer_optimizer": "sgd",
    "meta.keep_support_gradients": 1, "meta.adapted_rounding": "stochastic",
    "meta.shared_moments": False,
    "deepspeed.zero_stage": 2, "deepspeed.precision": "bf16", "deepspeed.micro_batch_size": 2,
    "deepspeed.gradient_accumulation_steps": 2, "deepspeed.reduce_bucket_size": 1000,
    "deepspeed.allgather_bucket_size": 1000,
    "deepspeed.stage3_param_persistence_threshold": 10, "deepspeed.loss_scale_window": 10,
    "deepspeed.initial_scale_power": 8, "deepspeed.config_file": None,
}  # fmt: skip
"""None: set by the test (a path it creates)."""
REFUSED = sorted(k for k, rule in RESUME_RULES.items() if rule.kind == "state")
APPLIED = sorted(k for k, rule in RESUME_RULES.items() if rule.kind in ("applied", "schedule"))


def test_every_field_has_one_rule():
    fields = set(_leaves(RunConfig()))
    assert set(RESUME_RULES) == fields | {WORLD_SIZE}
    assert set(NEW_VALUES) == fields
    assert all(rule.reason for rule in RESUME_RULES.values())


def _given(key: str, run: Path, tmp_path: Path) -> dict:
    value = NEW_VALUES[key]
    if key == "deepspeed.config_file":
        value = str(tmp_path / "ds.json")
        Path(value).write_text("{}")
    return {key: value}


@pytest.mark.parametrize("key", [k for k in REFUSED if k != "out_dir"])
def test_a_change_of_the_state_is_refused_naming_it(tmp_path, key):
    run = fake_run(tmp_path / "run", saved_config(tmp_path / "run"))
    given = _given(key, run, tmp_path)
    with pytest.raises(ResumeRefused) as refused:
        resume_config(run, given, flag_names={key: "--flag"})
    old = _leaves(saved_config(run))[key]
    assert f"--flag ({key}) {old!r} -> {given[key]!r}: " in str(refused.value)
    assert [c.key for c in refused.value.changes] == [key]
    assert "nothing was written" in str(refused.value)


@pytest.mark.parametrize("key", APPLIED)
def test_a_safe_change_is_applied(tmp_path, key):
    run = tmp_path / "run"
    saved = saved_config(run)
    if key == "out_dir":  # a moved run folder: the saved config names the old place
        saved.out_dir = "old/place"
    fake_run(run, saved, config_json=False)
    given = {} if key == "out_dir" else _given(key, run, tmp_path)
    plan = resume_config(run, given)
    new = _leaves(plan.config)[key]
    assert new == (str(run) if key == "out_dir" else given[key])
    assert [(c.key, c.old, c.new) for c in plan.applied] == [(key, _leaves(saved)[key], new)]


def test_resume_alone_takes_the_run_config_json(tmp_path):
    run = tmp_path / "run"
    saved = saved_config(run)
    fake_run(run, saved)
    plan = resume_config(run, {})
    assert plan.config.to_dict() == saved.to_dict() and plan.applied == []
    assert plan.tag == "step2"


def test_config_json_is_the_base_and_the_checkpoint_the_reference(tmp_path):
    run = tmp_path / "run"
    fake_run(run, saved_config(run))
    edited = saved_config(run)
    edited.max_steps = 6  # e.g. applied by a resume killed before its next checkpoint
    edited.save(run / "config.json")
    plan = resume_config(run, {})
    assert plan.config.max_steps == 6 and [c.key for c in plan.applied] == ["max_steps"]
    edited.data.num_demonstrations = 16
    edited.save(run / "config.json")
    with pytest.raises(ResumeRefused, match=r"data.num_demonstrations 4 -> 16"):
        resume_config(run, {})


def test_without_config_json_the_checkpoint_config_is_the_base(tmp_path):
    run = tmp_path / "run"
    fake_run(run, saved_config(run), config_json=False)
    assert resume_config(run, {}).config.to_dict() == saved_config(run).to_dict()


def test_nothing_to_resume(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        resume_config(tmp_path / "empty", {})


def test_world_size_is_refused_where_zero_partitions_the_state(tmp_path):
    run = tmp_path / "zero1"
    fake_run(run, saved_config(run), world_size=2)
    with pytest.raises(ResumeRefused, match=r"world size 2 -> 1: ZeRO 1-3 split"):
        resume_config(run, {}, world_size=1)
    assert resume_config(run, {}, world_size=2).applied == []
    zero0 = saved_config(tmp_path / "zero0")
    zero0.deepspeed.zero_stage = 0
    fake_run(tmp_path / "zero0", zero0, world_size=2)
    plan = resume_config(tmp_path / "zero0", {}, world_size=1)
    assert [(c.key, c.old, c.new) for c in plan.applied] == [(WORLD_SIZE, 2, 1)]


def test_every_refused_change_is_named_at_once(tmp_path):
    run = fake_run(tmp_path / "run", saved_config(tmp_path / "run"), world_size=2)
    given = {"method": "maml-2-2", "seed": 1, "optim.eps": 1e-6, "max_steps": 9}
    with pytest.raises(ResumeRefused) as refused:
        resume_config(run, given, world_size=1)
    assert {c.key for c in refused.value.changes} == {"method", "seed", "optim.eps", WORLD_SIZE}


def _scheduler(cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.optim.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg))


def _stepped(cfg: RunConfig, steps: int) -> dict:
    scheduler = _scheduler(cfg)
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
    return {"scheduler": scheduler.state_dict(), "optimizer": scheduler.optimizer.state_dict()}


def _resumed(cfg: RunConfig, saved: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """What a resume does: a new scheduler from `cfg`, the saved states loaded, then rebuilt."""
    scheduler = _scheduler(cfg)
    scheduler.optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rebuild_schedule(scheduler, cfg.optim.lr)
    return scheduler


def test_an_unchanged_schedule_resumes_bit_for_bit():
    cfg = RunConfig(max_steps=10)
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-4, 3
    straight = _scheduler(cfg)
    lrs = []
    for _ in range(7):
        lrs.append(straight.optimizer.param_groups[0]["lr"])
        straight.optimizer.step()
        straight.step()
    resumed = _resumed(cfg, _stepped(cfg, 4))
    after = []
    for _ in range(3):
        after.append(resumed.optimizer.param_groups[0]["lr"])
        resumed.optimizer.step()
        resumed.step()
    assert after == lrs[4:]


def test_a_new_lr_and_length_rebuild_the_schedule():
    old = RunConfig(max_steps=10)
    old.optim.lr = 1e-3
    new = RunConfig(max_steps=20)
    new.optim.lr = 5e-4
    resumed = _resumed(new, _stepped(old, 4))
    factor = linear_schedule(new)
    for step in range(4, 8):  # the lr each later update uses: new lr x the new factor
        assert resumed.optimizer.param_groups[0]["lr"] == 5e-4 * factor(step)
        resumed.optimizer.step()
        resumed.step()
    assert resumed.base_lrs == [5e-4]
