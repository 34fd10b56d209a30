"""MetaICL on DeepSpeed: 2 ranks x micro-batch 1 == 1 rank x micro-batch 2 (ZeRO 0, 2, 3)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import deepspeed_run, python_run

WORKER = Path(__file__).with_name("metaicl_worker.py")


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(synth_dir, tokenizer_dir, tmp_path):
    stages = ["0", "2", "3"]
    python_run(WORKER, synth_dir, tokenizer_dir, tmp_path, "2", *stages)
    deepspeed_run(WORKER, synth_dir, tokenizer_dir, tmp_path, "1", *stages, num_ranks=2)
    init = None
    for stage in stages:
        one = torch.load(tmp_path / f"zero{stage}-w2.pt")
        two = torch.load(tmp_path / f"zero{stage}-w1.pt")
        assert abs(one["loss"] - two["loss"]) < 1e-5
        for name, p in one["params"].items():
            torch.testing.assert_close(two["params"][name], p, atol=1e-6, rtol=0)
        if init is None:
            init = one
        else:  # every stage computes the same update
            for name, p in one["params"].items():
                torch.testing.assert_close(init["params"][name], p, atol=1e-6, rtol=0)
    # The update is real: parameters moved by far more than the tolerance.
    moved = max(float((p - one["init"][n]).abs().max()) for n, p in one["params"].items())
    assert moved > 5e-5
