"""The DeepSpeed internals `maml_ds.training.zero_layout` relies on, per ZeRO stage (1 rank).

A DeepSpeed upgrade that renames or retypes one of them fails here with the attribute's name
and the tested version, instead of deep inside a meta-update.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maml_ds.meta import SharedMomentAdamW
from maml_ds.training import zero_layout as Z
from tests.helpers import python_run

WORKER = Path(__file__).with_name("zero_layout_worker.py")
STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def results(synth_dir, tokenizer_dir, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("zero_layout")
    python_run(WORKER, synth_dir, tokenizer_dir, out, *map(str, STAGES))
    return {s: json.loads((out / f"zero{s}.json").read_text()) for s in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_every_internal_exists_with_its_type(results, stage):
    problems = results[stage]["problems"]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("stage", STAGES)
def test_the_layout_and_checkpoint_readers_see_the_engine_parameters(results, stage):
    got = results[stage]
    assert got["gather_names"] and got["gather_max_difference"] == 0.0
    assert got["state_keyed_by_owners"]
    assert got["is_checkpoint_tag"] and got["client_config"]
    assert got["checkpoint_max_difference"] == 0.0


def test_a_missing_internal_is_named_with_the_tested_version():
    client = SharedMomentAdamW([torch.zeros(2, requires_grad=True)])
    zero2 = SimpleNamespace(
        optimizer=client,
        param_groups=client.param_groups,
        round_robin_bit16_groups=[[torch.zeros(2)]],
        parallel_partitioned_bit16_groups=[[torch.zeros(2)]],
        bit16_groups_flat=[torch.zeros(2)],
        single_partition_of_fp32_groups=[torch.zeros(2)],
        averaged_gradients={},
    )
    engine = SimpleNamespace(
        optimizer=zero2, monitor=SimpleNamespace(enabled=False, write_events=print)
    )
    problems = Z.internals_problems(engine, 2)
    assert len(problems) == 1
    assert "engine.optimizer.round_robin_bit16_offsets" in problems[0]
    assert Z.TESTED_DEEPSPEED in problems[0] and "ZeRO-2" in problems[0]
    with pytest.raises(RuntimeError, match="round_robin_bit16_offsets"):
        Z.PartitionLayout(engine, 2)
