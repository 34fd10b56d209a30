"""`maml-ds eval / compare / adapt` end to end on a tiny model trained for 3 steps."""

from __future__ import annotations

import json
import shutil

import pytest

from maml_ds.data.reader import load_target_examples
from maml_ds.data.tasks import load_setting
from tests.helpers import maml_ds


@pytest.fixture(scope="module")
def run_dir(synth_dir, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-cli") / "run"
    maml_ds(
        "train",
        "--method",
        "metaicl",
        "--model",
        "tiny",
        "--max-steps",
        "3",
        "--k",
        "4",
        "--max-examples-per-task",
        "40",
        "--data",
        synth_dir,
        "--setting",
        "synthetic",
        "--tokenizer",
        tokenizer_dir,
        "--out",
        out,
    )
    assert (out / "final" / "config.json").is_file()
    return out


def _eval(*args: str):
    return maml_ds("eval", *args)


def _args(run_dir, synth_dir, out):
    return (
        "--model",
        run_dir,
        "--data",
        synth_dir,
        "--setting",
        "synthetic",
        "--seeds",
        "100,13",
        "--k",
        "16",
        "--batch-size",
        "8",
        "--out",
        out,
    )


@pytest.fixture(scope="module")
def first_eval(run_dir, synth_dir):
    """`maml-ds eval` on the run folder: (output folder, the process)."""
    out = run_dir.parent / "eval"
    return out, _eval(*_args(run_dir, synth_dir, out))


def test_eval_run_folder_json_table_and_cache(run_dir, synth_dir, first_eval):
    out, first = first_eval
    args = _args(run_dir, synth_dir, out)
    path = out / "eval_synthetic_all_direct_none_k16.json"
    result = json.loads(path.read_text())
    setting = load_setting("synthetic", synth_dir)
    assert result["label"] == "MetaICL" and result["kind"] == "eval"
    assert result["tasks"] == list(setting.test) and result["seeds"] == [100, 13]
    for task in setting.test:
        _, tests = load_target_examples(synth_dir, task, seed=100)
        for seed in ("100", "13"):
            entry = result["per_task"][task]["seeds"][seed]
            assert len(entry["predictions"]) == len(tests)
            assert all(p in ex.options for p, ex in zip(entry["predictions"], tests, strict=True))
            assert 0.0 <= entry["score"] <= 1.0
    per_seed = result["per_seed"]
    for seed in ("100", "13"):
        mean = sum(result["per_task"][t]["seeds"][seed]["score"] for t in setting.test)
        assert per_seed[seed] == pytest.approx(mean / len(setting.test))
    assert result["average"] == pytest.approx(sum(per_seed.values()) / 2)
    assert result["worst"] == pytest.approx(min(per_seed.values()))
    assert result["average"] > 0
    # the table in the paper's layout, average/worst x100
    cell = f"{100 * result['average']:.2f}/{100 * result['worst']:.2f}"
    assert "MetaICL" in first.stdout and cell in first.stdout
    assert "24 (task, seed) computed, 0 from the cache" in " ".join(first.stderr.split())

    # re-run: everything from the cache, the same numbers
    second = _eval(*args)
    assert "0 (task, seed) computed, 24 from the cache" in " ".join(second.stderr.split())
    assert json.loads(path.read_text())["per_task"] == result["per_task"] | {
        t: _with_cached(result["per_task"][t], True) for t in setting.test
    }

    # a corrupt and a partial cache file are recomputed, never scored 0
    files = sorted((out / "cache").rglob("*.json"))
    assert len(files) == 24
    files[0].write_text(files[0].read_text()[:40])
    files[1].write_text("")
    third = _eval(*args)
    assert "2 (task, seed) computed, 22 from the cache" in " ".join(third.stderr.split())
    again = json.loads(path.read_text())
    assert (again["average"], again["worst"]) == (result["average"], result["worst"])
    for task in setting.test:
        for seed in ("100", "13"):
            assert (
                again["per_task"][task]["seeds"][seed]["score"]
                == result["per_task"][task]["seeds"][seed]["score"]
            )


def _with_cached(task_entry: dict, cached: bool) -> dict:
    return task_entry | {
        "seeds": {s: e | {"cached": cached} for s, e in task_entry["seeds"].items()}
    }


def test_baseline_and_compare_win_rate_table(run_dir, synth_dir, first_eval, tmp_path):
    _eval(
        "--model",
        run_dir / "final",
        "--baseline",
        "no-icl",
        "--data",
        synth_dir,
        "--setting",
        "synthetic",
        "--seeds",
        "100,13",
        "--out",
        tmp_path,
    )
    files = [
        tmp_path / "eval_synthetic_all_direct_no-icl_k16.json",
        first_eval[0] / "eval_synthetic_all_direct_none_k16.json",
    ]
    no_icl, meta = (json.loads(f.read_text()) for f in files)
    assert no_icl["label"] == "No ICL" and no_icl["options"]["format"] == "spaces"
    proc = maml_ds("compare", *files, "--out", tmp_path / "compare.json")
    assert "win rate" in proc.stdout and "No ICL" in proc.stdout
    table = json.loads((tmp_path / "compare.json").read_text())
    wins = table["win_rate"]["MetaICL"]["No ICL"]
    expected = meta["average"] > no_icl["average"] and meta["worst"] > no_icl["worst"]
    assert (wins["wins"], wins["settings"]) == (int(expected), 1)


def test_eval_from_deepspeed_checkpoint_matches_the_export(
    run_dir, synth_dir, first_eval, tmp_path
):
    """Without final/, the run's latest (ZeRO-0) checkpoint is converted: same weights."""
    no_final = tmp_path / "run"
    shutil.copytree(run_dir, no_final, ignore=shutil.ignore_patterns("final", "eval"))
    _eval(*_args(no_final, synth_dir, tmp_path / "a"))
    name = "eval_synthetic_all_direct_none_k16.json"
    a = json.loads((tmp_path / "a" / name).read_text())
    b = json.loads((first_eval[0] / name).read_text())
    assert a["model_fingerprint"] == b["model_fingerprint"]
    assert (a["average"], a["worst"]) == (b["average"], b["worst"])


def test_adapt_cli(run_dir, synth_dir, tmp_path):
    proc = maml_ds(
        "adapt",
        "--model",
        run_dir,
        "--data",
        synth_dir,
        "--setting",
        "synthetic",
        "--seeds",
        "100",
        "--lr",
        "1e-4",
        "--steps",
        "16",
        "--out",
        tmp_path,
    )
    result = json.loads(next(tmp_path.glob("adapt_*.json")).read_text())
    setting = load_setting("synthetic", synth_dir)
    assert result["kind"] == "adapt" and result["label"] == "MetaICL +adapt"
    assert result["tasks"] == list(setting.unseen_domain_test)
    assert result["extra"]["adapt"]["lr"] == 1e-4
    for task in setting.unseen_domain_test:
        info = result["per_task"][task]["seeds"]["100"]["info"]
        assert info["adapt_steps"] == 16 and info["adapt_max_weight_change"] > 0
    assert "MetaICL +adapt" in proc.stdout


def test_eval_reports_every_bad_flag(run_dir):
    from launcher.eval_cmd import parse_seeds
    from maml_ds.config import ConfigError

    assert parse_seeds("100, 13,21") == (100, 13, 21)
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("100,x")
    proc = maml_ds(
        "eval",
        "--model",
        run_dir,
        "--baseline",
        "zero",
        "--batch-size",
        "0",
        "--variant",
        "sideways",
        check=False,
    )
    assert proc.returncode == 2
    for flag in ("--baseline", "--batch-size", "--variant"):
        assert flag in proc.stderr
