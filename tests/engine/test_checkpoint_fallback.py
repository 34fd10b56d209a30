"""Checkpoints verified on --resume: a broken newest one is named with its reason and the newest
complete one is taken, bit-equal to resuming from it directly; a changed method, model, ZeRO
stage or world size is refused before DeepSpeed loads anything, one line naming both values.

One process runs every case (tests/engine/checkpoint_worker.py); docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maml_ds.training import checkpoint as C
from tests.helpers import python_run

WORKER = Path(__file__).with_name("checkpoint_worker.py")
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"

# case -> (what the resume must say about the broken checkpoint, the step it resumes from)
FALLBACKS = {
    "truncated": (f"checkpoint step4 is broken: {OPTIM} has ", 2),
    "file_deleted": (f"checkpoint step4 is broken: {OPTIM} is missing", 2),
    "random_bytes": ("checkpoint step4 is broken: DeepSpeed could not load it (rank 0: ", 2),
    "empty_folder": ("checkpoint step4 is broken: an empty folder (its save never finished)", 2),
    "latest_empty": ("checkpoints/latest is empty", 4),
    "latest_missing": ("checkpoints/latest names 'step9', which does not exist", 4),
}


@pytest.fixture(scope="module")
def results(synth_dir, tokenizer_dir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("checkpoints")
    python_run(WORKER, synth_dir, tokenizer_dir, out)
    return torch.load(out / "results.pt")


@pytest.mark.parametrize("case", FALLBACKS)
def test_a_broken_checkpoint_is_named_and_the_newest_complete_one_taken(results, case):
    broken, step = FALLBACKS[case]
    got, direct = results[case], results[f"direct_step{step}"]
    assert broken in got["said"], got["said"]
    if step == 2:
        assert "resuming from step2 instead, the newest complete checkpoint" in got["said"]
    assert f"resumed from step {step} (" in got["said"]
    assert got["step"] == direct["step"] == 6
    for name, weight in direct["weights"].items():
        assert torch.equal(got["weights"][name], weight), name


def test_resuming_without_any_complete_checkpoint_names_each(results):
    error = results["all_broken"]["error"]
    assert error.startswith("no checkpoint to resume from in ")
    assert "checkpoint step4 is broken: no manifest.json" in error
    assert "checkpoint step2 is broken: no manifest.json" in error
    assert "\n" not in error


@pytest.mark.parametrize(
    "case, line",
    [
        ("changed_zero", "saved with --zero 2, this run has --zero 3: resume with --zero 2"),
        ("changed_zero0", "saved with --zero 2, this run has --zero 0: resume with --zero 2"),
        ("changed_method", "saved with --method metaicl, this run has --method maml-2-2"),
        ("changed_model", "saved with --model tiny, this run has --model tiny-128"),
        ("changed_world", "saved by 1 rank, this run has 2 ranks: ZeRO-2 keeps per-rank files"),
    ],
)
def test_a_changed_config_is_refused_before_loading(results, case, line):
    error = results[case]["error"]
    assert error.startswith("checkpoint step4 was ") and line in error
    assert "\n" not in error


def write_checkpoint(tag_dir: Path, files: dict[str, bytes], step: int) -> None:
    """A checkpoint folder with its manifest, as `checkpoint.save` leaves it."""
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    manifest = {
        "format": 1,
        "tag": tag_dir.name,
        "step": step,
        "world_size": 1,
        "config": {},
        "files": {name: len(data) for name, data in files.items()},
    }
    (tag_dir / C.MANIFEST).write_text(json.dumps(manifest))


def test_verify_needs_the_manifest_and_every_file_at_its_size(tmp_path):
    write_checkpoint(tmp_path / "step3", {MODEL: b"abcd", OPTIM: b"efgh"}, 3)
    assert C.verify(tmp_path / "step3").problem is None
    (tmp_path / "step3" / OPTIM).write_bytes(b"ef")
    assert C.verify(tmp_path / "step3").problem == f"{OPTIM} has 2 bytes, the manifest says 4"
    (tmp_path / "step3" / C.MANIFEST).write_text("{")
    assert C.verify(tmp_path / "step3").problem == "manifest.json is unreadable (JSONDecodeError)"
    assert C.verify(tmp_path / "nope").problem == "the folder does not exist"


def test_latest_is_taken_when_complete_even_if_a_newer_one_exists(tmp_path):
    write_checkpoint(tmp_path / "step2", {MODEL: b"a"}, 2)
    write_checkpoint(tmp_path / "step4", {MODEL: b"b"}, 4)
    (tmp_path / C.LATEST).write_text("step2")
    choice, passed_over = C.resume_choice(tmp_path)
    assert choice is not None and choice.tag == "step2" and passed_over == []
    (tmp_path / "step2" / MODEL).unlink()
    choice, passed_over = C.resume_choice(tmp_path)
    assert choice is not None and choice.tag == "step4"
    assert passed_over == [f"checkpoint step2 is broken: {MODEL} is missing"]
    assert C.holds_checkpoints(tmp_path)
    (tmp_path / C.LATEST).write_text("")
    assert C.latest_tag(tmp_path) is None and C.holds_checkpoints(tmp_path)
