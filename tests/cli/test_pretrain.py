"""`maml-ds pretrain` (copy pre-training) and the validation curve of `train`, end to end on a
tiny model: the copy loss falls below a threshold on a tiny budget, resume is exact, the
exported model records its seed and command; --validate-every writes the curve and RUN/best."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from maml_ds.data.word_tokenizer import word_level_tokenizer
from tests.helpers import maml_ds

WORDS = [f"w{i}" for i in range(12)]
COPY = ["--max-steps", "150", "--copy-min-length", "2", "--copy-max-length", "4",
        "--copy-max-prefix", "1", "--copy-offset-from", "0", "--copy-position-offset", "4",
        "--micro-batch-size", "16", "--warmup-steps", "10", "--lr", "3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def twelve_words(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok12")
    word_level_tokenizer(WORDS).save_pretrained(out)
    return out


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_pretrain_learns_to_copy_and_resumes_exactly(synth_dir, twelve_words, tmp_path):
    args = ["--data", synth_dir, "--tokenizer", twelve_words, *COPY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = maml_ds("pretrain", *args, "--out", straight)
    note = json.loads((straight / "final" / "pretrain.json").read_text())
    # uniform over the 12 words is ln 12 = 2.48 nats: copying is what gets below it
    assert note["final_copy_loss"] < 0.6 * math.log(len(WORDS)), note
    assert note["seed"] == 100 and note["command"].startswith("maml-ds pretrain ")
    assert f"final copy loss {note['final_copy_loss']:.3f}" in " ".join(done.stderr.split())
    config = json.loads((straight / "config.json").read_text())
    assert config["method"] == "copy" and config["max_steps"] == 150

    maml_ds("pretrain", *args, "--out", split, "--stop-after", "70")
    maml_ds("pretrain", "--out", split, "--resume")  # the run's own config
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [r["loss"] for r in _history(split)] == [r["loss"] for r in _history(straight)]

    again = maml_ds("pretrain", *args, "--out", straight, check=False)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_validation_curve_and_best_weights(synth_dir, tmp_path):
    run = tmp_path / "run"
    maml_ds("train", "--method", "metaicl", "--model", "tiny", "--data", synth_dir, "--out", run,
            "--max-steps", "5", "--validate-every", "2", "--tasks", "fresh", "--copy-share",
            "0.3", "--format", "spaces", "--score-demonstrations", "--k", "16",
            "--micro-batch-size", "2", "--lr", "1e-3")  # fmt: skip
    record = json.loads((run / "validation.json").read_text())
    curve = record["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 5]  # the start, every 2 updates, the end
    families = {"attribute", "keyword", "nli", "paraphrase", "qa", "topic"}
    assert all({f"val_{f}" for f in families} <= set(p) for p in curve)
    best = max(curve, key=lambda p: p["val_score"])  # the first of equal scores
    assert record["best_step"] == best["step"] and record["best_score"] == best["val_score"]
    note = json.loads((run / "best" / "maml_ds_export.json").read_text())
    assert note["step"] == best["step"] and "best validation" in note["source"]
    logged = {r["step"]: r.get("val_score") for r in _history(run)}
    assert logged == {1: None, 2: curve[1]["val_score"], 3: None, 4: curve[2]["val_score"],
                      5: curve[3]["val_score"]}  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data"]["format"] == "spaces"
