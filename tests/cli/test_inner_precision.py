"""Precision of the adaptation (issue 11): at bf16 an inner step below the weights' 16-bit
resolution is mostly lost; the MAML step measures the share that reaches the forward, logs it
in history.jsonl and warns once when most of it is lost; --adapted-rounding stochastic keeps it
in expectation (maml_ds/meta/precision.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import maml_ds


def test_a_kept_inner_step_is_measured_and_not_warned(synth_dir, tokenizer_dir, tmp_path):
    """inner lr 1e-2: the step survives bf16 (a lost one warns: the nearest runs below)."""
    run = tmp_path / "run"
    proc = maml_ds("train", "--method", "maml-2-2", "--zero", "3", "--precision", "bf16",
                   "--inner-lr", "1e-2", "--lr", "1e-3", "--max-steps", "2", "--model", "tiny",
                   "--data", synth_dir, "--tokenizer", tokenizer_dir, "--k", "4",
                   "--max-examples-per-task", "40", "--out", run)  # fmt: skip
    first = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert "reach the bf16 forward" not in " ".join(proc.stderr.split())
    assert first["inner_kept"] > 0.9 and first["inner_cosine"] > 0.9


def _losses(run) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["support_loss"], r["query_loss"]) for r in rows if "query_loss" in r]


@pytest.mark.parametrize("zero", ["2", "3"])  # the gather path; the sharded path
def test_stochastic_rounding_of_the_adapted_point(synth_dir, tokenizer_dir, tmp_path, zero):
    """At inner lr 1e-7 nearest rounding loses the step and warns once (naming the flag);
    --adapted-rounding stochastic: no warning, other losses than nearest; on the
    sharded path also the same losses after a stop + resume, whose second update is drawn in
    another process (the draws are fixed per batch)."""
    common = ["train", "--method", "maml-4-1", "--zero", zero, "--precision", "bf16",
              "--inner-lr", "1e-7", "--lr", "1e-3", "--max-steps", "2", "--model", "tiny",
              "--data", synth_dir, "--tokenizer", tokenizer_dir, "--k", "4",
              "--max-examples-per-task", "40", "--save-every", "1"]  # fmt: skip
    stochastic = [*common, "--adapted-rounding", "stochastic"]
    proc = maml_ds(*stochastic, "--out", tmp_path / "sr")
    assert "reach the bf16 forward" not in " ".join(proc.stderr.split())
    nearest = maml_ds(*common, "--out", tmp_path / "nearest")  # the step is lost: one warning
    text = " ".join(nearest.stderr.split())
    assert text.count("reach the bf16 forward") == 1, nearest.stderr[-2000:]
    assert "--adapted-rounding stochastic" in text and "--inner-lr" in text
    first = json.loads((tmp_path / "nearest" / "history.jsonl").read_text().splitlines()[0])
    assert first["inner_kept"] < 0.5
    sr = _losses(tmp_path / "sr")
    assert len(sr) == 2 and sr != _losses(tmp_path / "nearest")
    if zero == "3":
        maml_ds(*stochastic, "--stop-after", "1", "--out", tmp_path / "resumed")
        maml_ds(*stochastic, "--resume", "--out", tmp_path / "resumed")
        assert sr == _losses(tmp_path / "resumed")
