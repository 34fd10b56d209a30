"""`maml-ds memory`: tables, JSON, plot, errors, and a real measurement on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from tests.helpers import maml_ds

runner = CliRunner()
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def flat(text: str) -> str:
    return " ".join(text.split())


def test_paper_setup_json(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(
        app,
        [
            "memory",
            "--model",
            "gpt2-medium",
            "--method",
            "maml-2-4",
            "--nodes",
            "1",
            "--gpus",
            "8",
            "--zero",
            "2",
            "--precision",
            "fp16",
            "--json",
            str(out),
            "--breakdown",
        ],
    )
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "354,823,168 parameters" in text and "S(theta) = 0.710 GB in fp16" in text
    assert "(1.419 GB fp32)" in text
    assert "memory vs number of tasks" in text and "meta-gradient accumulator" in text
    data = json.loads(out.read_text())
    p = 354_823_168
    assert data["s_theta_bytes"] == 2 * p
    assert data["paper_bytes"] == 6 * 2 * p  # (k+2) S, k = n = 4
    assert data["model_states_bytes"] == data["deepspeed_estimate_bytes"]
    assert data["deepspeed_estimate_bytes"] == 2 * p + 18 * p // 8
    r = {row["key"]: row["bytes"] for row in data["rows"]}
    q = 4 * p // 8  # one fp32 partition per rank
    assert r["adapted_copy"] == q and r["hvp_vectors"] == 2 * q  # D_j u and the FD point share
    assert r["meta_gradient_accumulator"] == q  # the engine's sum over the n = 4 tasks
    assert r["gather_backward"] == 2 * 4 * p  # fp32 gradients + their concatenation
    assert data["peak_phase"] in ("loss forward", "loss backward end")
    assert [pt["num_tasks"] for pt in data["vs_num_tasks"]] == list(range(1, 9))


def test_answer_first():
    """Without --breakdown: the peak, the cards it fits, the largest term and its flag."""
    args = ["memory", "--model", "gpt2-xl", "--method", "maml-2-4", "--gpus", "8", "--zero", "3",
            "--precision", "bf16"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "predicted peak per GPU: " in text and "a100-80gb yes" in text
    assert "largest term: activations" in text and "--activation-checkpointing gives" in text
    assert "gather backward" not in text and "memory vs number of tasks" not in text
    one = runner.invoke(app, [*args, "--activation-checkpointing", "--preset", "v100-16gb"])
    assert "v100-16gb yes" in flat(one.output) and "a100-80gb" not in flat(one.output)


def test_metaicl_table():
    result = runner.invoke(
        app,
        ["memory", "--model", "gpt2", "--zero", "3", "--gpus", "4", "--precision", "bf16",
         "--breakdown"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "paper formula" in text and "2*S(theta)" in text
    assert "ZeRO-3 gathered layer" in text and "DeepSpeed estimate" in text
    assert "adapted parameters" not in text  # MAML rows are not shown for MetaICL


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "gpt5"], "unknown model 'gpt5'"),
        (["--method", "maml-2"], "unknown method 'maml-2'"),
        (["--zero", "5"], "--zero must be 0, 1, 2 or 3"),
        (["--seq-len", "4096"], "exceeds the model's 1024 positions"),
        (["--measure-tasks", "0,x"], "--measure-tasks must be positive integers"),
    ],
)
def test_errors(args, expected):
    result = runner.invoke(app, ["memory", *args])
    assert result.exit_code == 2
    assert expected in flat(result.output)


def test_measure_what_the_engine_refuses(tmp_path):
    """MAML at ZeRO-0 with bf16 is refused by maml_ds.config.engine_problems: the prediction is
    printed, the measurement is reported as not run (exit 2), nothing is started."""
    out = tmp_path / "m.json"
    args = ["memory", "--method", "maml-2-1", "--zero", "0", "--precision", "bf16", "--measure"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "predicted peak" in text  # the model's answer is still there
    assert (
        "--measure did not run" in text and "maml_ds.training.maml refuses this at start-up" in text
    )
    assert "--zero 1 or 2 for fp16/bf16" in text  # the engine's own reason
    data = json.loads(out.read_text())
    assert data["measured"] == [] and "refuses" in data["measure_error"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the `plot` extra) is not installed")
def test_plot(tmp_path):
    out = tmp_path / "mem.png"
    result = runner.invoke(
        app,
        [
            "memory",
            "--model",
            "gpt2-medium",
            "--method",
            "maml-2-4",
            "--gpus",
            "8",
            "--zero",
            "2",
            "--precision",
            "fp16",
            "--plot",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = runner.invoke(app, ["memory", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    expected = "--plot needs matplotlib, maml-ds's optional `plot` extra: pip install matplotlib"
    assert expected in flat(result.output)


def test_measure_metaicl_matches_prediction(tmp_path):
    """Real MetaICL steps (setup + metaicl_step, 1 CPU process) vs the model: 15%.

    --precision fp16 is measured with bf16 on CPU (same bytes per element; noted in the output).
    """
    out = tmp_path / "m.json"
    proc = maml_ds(
        "memory",
        "--model",
        "gpt2-medium",
        "--method",
        "metaicl",
        "--zero",
        "2",
        "--precision",
        "fp16",
        "--measure",
        "--measure-tasks",
        "1,8",
        "--json",
        str(out),
        timeout=300,
    )
    data = json.loads(out.read_text())
    measured = data["measured"]
    assert [m["num_tasks"] for m in measured] == [1, 8]
    for m in measured:
        assert m["counter"] == "LiveTensorBytes" and m["precision"] == "bf16"
        assert m["zero_stage"] == 2
        assert abs(m["measured_peak_bytes"] / m["predicted_peak_bytes"] - 1) < 0.15, m
    # MetaICL accumulating n micro-batches stays flat in n
    peaks = [m["measured_peak_bytes"] for m in measured]
    assert max(peaks) / min(peaks) < 1.05
    assert "measured with bf16" in flat(proc.stdout)


def test_measure_maml_matches_prediction(tmp_path):
    """Real meta-updates (setup + maml_ds.training.maml.MamlStep, 1 CPU process, ZeRO-2, bf16,
    hvp-fd) of the measure model for n = 1, 2 vs the model: 15%; memory flat in n."""
    out = tmp_path / "m.json"
    proc = maml_ds(
        "memory", "--model", "gpt2-medium", "--method", "maml-2-4", "--zero", "2",
        "--precision", "bf16", "--measure", "--measure-tasks", "1,2", "--json", str(out),
        timeout=300,
    )  # fmt: skip
    data = json.loads(out.read_text())
    measured = data["measured"]
    assert [m["method"] for m in measured] == ["maml-2-1", "maml-2-2"]
    for m in measured:
        assert m["counter"] == "LiveTensorBytes" and m["precision"] == "bf16"
        assert m["zero_stage"] == 2 and m["world_size"] == 1
        assert abs(m["measured_peak_bytes"] / m["predicted_peak_bytes"] - 1) < 0.15, m
    one, two = (m["measured_peak_bytes"] for m in measured)
    p = measured[0]["num_params"]
    # The paper's (n+2)*S(theta) grows by S per task; the engine adds one fp32 partition (its
    # meta-gradient accumulator) from n = 2 on, then stays flat.
    assert measured[1]["paper_bytes"] - measured[0]["paper_bytes"] == 2 * p
    assert 0 <= two - one <= 1.05 * 4 * p
    assert "(n+2)*S(theta)" in flat(proc.stdout)
