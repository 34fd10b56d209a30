"""Non-finite updates never reach the weights (MetaICL and MAML at ZeRO 0, 2, 3, one rank).

Per case (tests/engine/nonfinite_worker.py): one good update, then a faulty one (lr 1e10 makes
every later loss non-finite; or a NaN gradient with finite losses) must leave the fp32 weights,
the module's parameters and the whole optimizer state bit-equal, advance the LR schedule, and be
counted in history.jsonl; M consecutive skips stop the run with a complete checkpoint of the last
good weights and `EXIT_NON_FINITE`. The CLI: exit code, message and the mostly-skipped warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from maml_ds.training.stop import EXIT_NON_FINITE
from tests.helpers import maml_ds, python_run

WORKER = Path(__file__).with_name("nonfinite_worker.py")
CASES = [
    *(f"metaicl-zero{s}-{fault}" for s in (0, 2, 3) for fault in ("lr", "grad")),
    *(f"maml-2-2-zero{s}-lr" for s in (0, 2, 3)),
]


@pytest.fixture(scope="module")
def results(synth_dir, tokenizer_dir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("nonfinite")
    python_run(WORKER, synth_dir, tokenizer_dir, out, *CASES)
    return {case: json.loads((out / f"{case}.json").read_text()) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_a_skipped_update_leaves_weights_and_optimizer_state_bit_equal(results, case):
    got = results[case]
    assert got["weights_finite"] and got["state_nonempty"]
    assert got["params_equal"] and got["state_equal"]
    assert got["schedule_advanced"]  # documented: a skipped update advances the LR schedule
    assert got["num_skipped"] == 1


@pytest.mark.parametrize("case", CASES)
def test_skips_are_counted_in_history_and_m_in_a_row_stop_with_a_checkpoint(results, case):
    got = results[case]
    history = got["history"]
    assert [r["step"] for r in history] == [1, 2, 3]
    assert [r["skipped"] for r in history] == [0.0, 1.0, 1.0]
    assert [r["overflow"] for r in history] == [0.0, 0.0, 0.0]
    assert math.isfinite(history[0]["loss"])
    if case.endswith("grad"):  # the gradient is checked, not only the loss
        assert all(math.isfinite(r["loss"]) for r in history)
    assert got["stop_exit_code"] == EXIT_NON_FINITE
    assert got["stop_tag"] == "step3" and got["stop_latest"] == "step3" and got["stop_complete"]
    assert got["stop_weights_equal"]  # the checkpoint holds the last good weights
    assert got["stop_message"].startswith("stopped at update 3: the last 2 updates were all")
    assert "holds the weights after update 1, the last one applied" in got["stop_message"]


def test_the_cli_exits_with_its_code_and_warns_when_most_updates_were_skipped(
    synth_dir, tokenizer_dir, tmp_path
):
    args = ["train", "--method", "metaicl", "--data", synth_dir, "--tokenizer", tokenizer_dir,
            "--model", "tiny", "--k", "4", "--micro-batch-size", "2", "--lr", "1e10"]  # fmt: skip
    proc = maml_ds(*args, "--out", tmp_path / "stopped", "--max-steps", "30", check=False)
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-3000:]
    assert "stopped at update 11: the last 10 updates were all skipped" in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = (tmp_path / "stopped" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["skipped"] for line in lines] == [0.0] + [1.0] * 10
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text() == "step11"
    proc = maml_ds(*args, "--out", tmp_path / "warned", "--max-steps", "4")
    text = " ".join(proc.stderr.split())
    assert "warning: 3 of 4 updates were skipped (3 non-finite loss or gradient" in text
