"""Bad `--model` input to train, eval and adapt: one line naming the problem and the fix, exit
2, no traceback (one with MAML_DS_DEBUG=1, what `--debug` sets)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import maml_ds

BROKEN = {  # case: (what is broken, the words the message must hold)
    "missing": ("no folder at all", "no such folder; give an existing model folder"),
    "config": ("config.json not JSON", "config.json is not valid JSON"),
    "tokenizer": ("tokenizer.json not JSON", "cannot load the tokenizer"),
    "weights": ("random bytes", "its files are damaged or incomplete"),
    "truncated": ("half the safetensors file", "its files are damaged or incomplete"),
}


@pytest.fixture(scope="module")
def model_folders(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A working tiny Hugging Face folder, and one broken copy per case."""
    from maml_ds.models import build_model

    root = tmp_path_factory.mktemp("models")
    good = root / "good"
    build_model("tiny", vocab_size=len(tokenizer)).save_pretrained(good)
    tokenizer.save_pretrained(good)
    folders = {"missing": root / "does" / "not" / "exist"}
    for case in ("config", "tokenizer", "weights", "truncated"):
        folders[case] = root / case
        shutil.copytree(good, folders[case])
    (folders["config"] / "config.json").write_text("{not json")
    (folders["tokenizer"] / "tokenizer.json").write_text("garbage")
    (folders["weights"] / "model.safetensors").write_bytes(os.urandom(4096))
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folders


def command(kind: str, model: Path, synth_dir: Path, out: Path) -> list:
    if kind == "train":
        return ["train", "--model", model, "--data", synth_dir, "--out", out, "--max-steps", "1",
                "--k", "4"]  # fmt: skip
    return [kind, "--model", model, "--data", synth_dir, "--setting", "synthetic", "--k", "4",
            "--seeds", "100", "--out", out]  # fmt: skip


@pytest.mark.parametrize("kind", ["train", "eval", "adapt"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_model_is_one_line(model_folders, synth_dir, tmp_path, kind, case):
    model = model_folders[case]
    proc = maml_ds(*command(kind, model, synth_dir, tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert BROKEN[case][1] in errors[0] and str(model) in errors[0]


def test_debug_mode_shows_the_traceback(model_folders, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MAML_DS_DEBUG", "1")
    model = model_folders["weights"]
    proc = maml_ds(*command("eval", model, synth_dir, tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "SafetensorError" in proc.stderr
    assert "error: cannot load model" in proc.stderr


@pytest.mark.parametrize(
    "content", ['{"version": "1.0", "model": {"type": "Nope"}}', '{"added_tokens": [], "model": 1}']
)
def test_a_tokenizer_json_of_the_wrong_shape_is_a_config_error(model_folders, tmp_path, content):
    from maml_ds.config import ConfigError
    from maml_ds.models import load_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(model_folders["tokenizer"], folder)
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(ConfigError, match=r"cannot load the tokenizer .*save it again"):
        load_tokenizer(folder)
