"""`maml-ds plot RUN...`: loss curves of several runs into a PNG (matplotlib, the plot extra)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from launcher.cli import app

runner = CliRunner()


def fake_run(path, losses, **extra):
    path.mkdir(parents=True)
    lines = [
        json.dumps({"step": i, "loss": loss, **{k: v[i - 1] for k, v in extra.items()}})
        for i, loss in enumerate(losses, start=1)
    ]
    (path / "history.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_plot_writes_a_png_of_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path / "metaicl", [3.0, 2.5, 2.2])
    b = fake_run(tmp_path / "maml", [3.1, 2.4, 2.0], query_loss=[3.0, 2.3, 1.9])
    out = tmp_path / "plots" / "loss.png"
    result = runner.invoke(app, ["plot", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "2 curve(s)" in result.output
    out2 = tmp_path / "q.png"
    result = runner.invoke(
        app, ["plot", str(b), "--metric", "loss", "--metric", "query_loss", "--out", str(out2)]
    )
    assert result.exit_code == 0 and "2 curve(s)" in result.output and out2.is_file()


def test_plot_names_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "no history.jsonl" in result.output
    run = fake_run(tmp_path / "metaicl", [1.0])
    result = runner.invoke(app, ["plot", str(run), "--metric", "query_loss"])
    assert result.exit_code == 2
    assert "has no 'query_loss' values" in " ".join(result.output.split())
