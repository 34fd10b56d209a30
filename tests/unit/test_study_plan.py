"""`maml-ds study` without models: the plans of the presets, the runner on stand-in commands
(resume, redo, failure, SIGKILL), and the report's numbers from hand-made result files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from maml_ds.config import ConfigError
from maml_ds.study import (
    RECIPES,
    Step,
    StepFailed,
    StudyState,
    build_plan,
    gather,
    preset_config,
    read_plan,
    run_steps,
    write_png,
)
from maml_ds.study.config import ABLATION_ROWS, PAPER_SETTINGS, SHIPPED_START
from maml_ds.study.plan import Plan, ResultRef

REPO = Path(__file__).resolve().parents[2]


def _paper(tmp_path: Path):
    return replace(
        preset_config("paper"), data_dir=str(tmp_path / "metaicl"), out_dir=str(tmp_path)
    )


def _args(step: Step) -> dict[str, str]:
    """The `--flag value` pairs of a command (switches map to "")."""
    out, argv = {}, list(step.argv)
    for i, word in enumerate(argv):
        if word.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            out[word] = "" if nxt.startswith("--") else nxt
    return out


def test_every_preset_plans_a_consistent_grid(tmp_path):
    for name in ("cpu", "quick", "paper"):
        cfg = preset_config(name) if name != "paper" else _paper(tmp_path)
        plan = build_plan(replace(cfg, out_dir=str(tmp_path / name)).validate())
        ids = [s.id for s in plan.steps]
        assert len(ids) == len(set(ids)), name
        for i, step in enumerate(plan.steps):
            assert step.argv[0] == "maml-ds" and step.outputs, step.id
            assert set(step.needs) <= set(ids[:i]), f"{step.id} needs a later step"
        results = [s.result for s in plan.steps if s.result is not None]
        assert len({r.path for r in results}) == len(results), "two steps write one result file"
        for part in {p for r in results for p in r.parts}:
            cells = [(r.label, r.setting, r.scope) for r in results if part in r.parts]
            assert len(cells) == len(set(cells)), f"{name}/{part}: one row and column twice"


def test_paper_plan_is_tables_2_to_5(tmp_path):
    plan = build_plan(_paper(tmp_path).validate())
    trains = [s for s in plan.steps if s.kind == "train"]
    # 7 settings x 2 variants x 3 methods x (complete, limited) + the 6 ablation rows
    assert len(trains) == 7 * 2 * 3 * 2 + len(ABLATION_ROWS)
    assert len([s for s in plan.steps if s.kind == "adapt"]) == 7 * 2 * 3
    for step in trains:
        args = _args(step)
        assert step.argv[:3] == ("maml-ds", "launch", "--method")
        assert args["--preset"] == "v100-32gb" and args["--gpus"] == "8"
        assert args["--max-steps"] == "50000" and args["--lr"] == "1e-05"
        assert args["--k"] == "16" and args["--seed"] == "100" and args["--model"] == "gpt2-medium"
        assert ("--train-fraction" in args) == (".limited." in step.id or ".ablation." in step.id)
        if args["--method"].startswith("maml"):
            assert args["--inner-lr"] == "1e-05" and args["--second-order"] == "hvp-fd"
    sgd = plan.step("train.ablation.non_nli_to_nli.maml-2-1-sgd-adamw")
    assert _args(sgd)["--inner-optimizer"] == "sgd" and "--no-shared-moments" in sgd.argv
    assert (
        "--shared-moments" in plan.step("train.ablation.non_nli_to_nli.maml-2-1-adamw-adamw").argv
    )
    adapt = plan.step("adapt.complete.qa_to_qa.maml-2-4-channel")
    assert _args(adapt)["--lr"] == "1e-07" and _args(adapt)["--steps"] == "16"
    assert _args(adapt)["--variant"] == "channel"
    labels = {s.result.label for s in plan.steps if s.result is not None}
    assert {"No ICL", "Raw LM", "Channel Raw LM", "MAML-2-4 +adapt", "MetaICL SGD"} <= labels
    columns = {(s.result.setting, s.result.scope) for s in plan.steps if s.result is not None}
    assert {(s, scope) for s in PAPER_SETTINGS for scope in ("all", "unseen")} <= columns
    assert read_plan_round_trip(plan, tmp_path).to_json() == plan.to_json()


def read_plan_round_trip(plan: Plan, tmp_path: Path) -> Plan:
    path = tmp_path / "copy" / "plan.json"
    path.parent.mkdir()
    path.write_text(json.dumps(plan.to_json()))
    back = read_plan(path)
    back.out_dir = plan.out_dir
    return back


def test_cpu_plan_starts_every_method_from_the_shipped_model(tmp_path):
    plan = build_plan(replace(preset_config("cpu"), out_dir=str(tmp_path)).validate())
    assert plan.steps[0].id == "data" and not any(s.kind == "start" for s in plan.steps)
    start = str(SHIPPED_START)
    for step in plan.steps[1:]:
        args = _args(step)
        if step.kind == "train":
            recipe = RECIPES["cpu"][args["--method"]]
            assert args["--model"] == start and args["--gpus"] == "2" and args["--preset"] == "cpu"
            assert args["--max-steps"] == str(recipe.max_steps)
            assert args["--tasks"] == "fresh" and args["--format"] == "spaces"
            assert args["--validate-every"] == str(recipe.validate_every) != "0"
        elif step.id.startswith("baseline."):
            assert args["--model"] == start and step.needs == ("data",)
            assert args["--format"] == "spaces"
        else:  # the best-validating weights of its training
            assert args["--model"] == plan.step(step.needs[0]).run_dir + "/best", step.id


def test_a_builtin_start_is_copy_pretrained_once(tmp_path):
    cfg = replace(preset_config("cpu"), out_dir=str(tmp_path), starting_model="tiny").validate()
    plan = build_plan(cfg)
    assert [s.id for s in plan.steps[:2]] == ["data", "start.pretrain"]
    pretrain = _args(plan.step("start.pretrain"))
    assert pretrain["--method"] == "copy" and pretrain["--max-steps"] == "2800"
    start = str(tmp_path / "start" / "pretrain" / "final")
    for step in plan.steps[2:]:
        if step.kind == "train" or step.id.startswith("baseline."):
            assert _args(step)["--model"] == start
            assert "start.pretrain" in step.needs


def test_the_shipped_start_is_the_pretrain_of_the_seed_0_suite(tmp_path):
    from maml_ds.data.synth import write_synthetic_suite
    from maml_ds.models import load_tokenizer

    note = json.loads((SHIPPED_START / "pretrain.json").read_text())
    assert note["seed"] == 100 and "maml-ds pretrain" in note["command"]
    assert "--model tiny-128" in note["command"] and "--seed 0" in note["command"]
    write_synthetic_suite(tmp_path / "suite", seed=0)
    suite = load_tokenizer(tmp_path / "suite" / "tokenizer").get_vocab()
    assert load_tokenizer(SHIPPED_START).get_vocab() == suite
    config = json.loads((SHIPPED_START / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (2, 128, len(suite))
    with pytest.raises(ConfigError, match="synthetic suite of seed 0 only"):
        replace(preset_config("cpu"), synthetic_seed=1).validate()


def test_plan_without_pretraining_writes_the_random_init_start_once(tmp_path):
    cfg = replace(
        preset_config("cpu"), out_dir=str(tmp_path), starting_model="tiny", pretrain_steps=0
    ).validate()
    plan = build_plan(cfg)
    assert [s.id for s in plan.steps[:3]] == ["data", "start.init", "start.export"]
    assert plan.step("start.init").argv[-2:] == ("--stop-after", "0")


def test_config_problems_name_the_flag():
    cfg = replace(
        preset_config("cpu"),
        parts=("complete", "tables"),
        methods=("metaicl", "maml-3-1", "maml-2-8"),
        variants=("noisy",),
        settings=("hr_to_lr",),
        eval_seeds=(1, 1),
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for expected in (
        "--parts: unknown 'tables'",
        "--variants: unknown 'noisy'",
        "maml-3-1",
        "no recipe for 'maml-2-8'",
        "'hr_to_lr' is not one of the synthetic",
        "--seeds",
    ):
        assert expected in text
    with pytest.raises(ConfigError, match="unknown study preset 'gpu'"):
        preset_config("gpu")


# --------------------------------------------------------------------------------------------
# The runner, on stand-in commands
# --------------------------------------------------------------------------------------------


def _fake_step(step_id: str, out: Path, *, code: int = 0, sleep: float = 0.0, needs=()) -> Step:
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        from pathlib import Path
        def term(*_):
            Path({str(out)!r} + ".term").write_text("x"); sys.exit(143)
        signal.signal(signal.SIGTERM, term)
        print("working", "on", "{step_id}", flush=True)  # not the command line's own words
        time.sleep({sleep})
        if {code}: sys.exit({code})
        Path({str(out)!r}).write_text("{step_id}")
        """
    )
    return Step(step_id, "eval", (sys.executable, "-c", script), (str(out),), tuple(needs))


def test_runner_skips_finished_steps_redoes_incomplete_ones_and_their_dependents(tmp_path):
    a = _fake_step("a", tmp_path / "a.out")
    b = _fake_step("b", tmp_path / "b.out", needs=("a",))
    c = _fake_step("c", tmp_path / "c.out")
    lines: list[str] = []
    assert run_steps([a, b, c], tmp_path, echo=lines.append) == 3
    assert set(StudyState.load(tmp_path).finished) == {"a", "b", "c"}
    lines.clear()
    assert run_steps([a, b, c], tmp_path, echo=lines.append) == 0
    assert [line.split()[1:3] for line in lines] == [["done", "earlier"]] * 3
    (tmp_path / "a.out").unlink()  # a finished step whose output went: redone, and b with it
    lines.clear()
    assert run_steps([a, b, c], tmp_path, echo=lines.append) == 2
    assert "done earlier  c" in lines[2] and "done earlier" not in lines[0] + lines[1]
    assert (tmp_path / "logs" / "a.log").read_text().count(
        "maml-ds study: "
    ) == 2  # a header per attempt
    assert (tmp_path / "logs" / "c.log").read_text().count("maml-ds study: ") == 1


def test_runner_stops_at_a_failing_step_naming_its_log_and_command(tmp_path):
    steps = [_fake_step("ok", tmp_path / "ok.out"), _fake_step("bad", tmp_path / "bad.out", code=7)]
    steps.append(_fake_step("after", tmp_path / "after.out"))
    with pytest.raises(StepFailed) as err:
        run_steps(steps, tmp_path, echo=lambda _: None)
    assert err.value.step.id == "bad" and "exit code 7" in err.value.reason
    assert (
        err.value.log == tmp_path / "logs" / "bad.log"
        and "working on bad" in err.value.log.read_text()
    )
    assert err.value.rerun.startswith(sys.executable)
    assert set(StudyState.load(tmp_path).finished) == {"ok"}
    # exit code 0 but the output is missing: a failure too
    silent = replace(
        _fake_step("bad", tmp_path / "elsewhere"), outputs=(str(tmp_path / "bad.out"),)
    )
    with pytest.raises(StepFailed, match="without writing"):
        run_steps([steps[0], silent], tmp_path, echo=lambda _: None)


def test_a_study_killed_during_a_step_redoes_that_step_only(tmp_path):
    steps = [
        _fake_step("first", tmp_path / "1.out"),
        _fake_step("slow", tmp_path / "2.out", sleep=60),
    ]
    plan_file = tmp_path / "steps.json"
    plan_file.write_text(json.dumps([s.to_json() for s in steps]))
    driver = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from maml_ds.study import Step, run_steps
        steps = [Step.from_json(s) for s in json.loads(Path({str(plan_file)!r}).read_text())]
        run_steps(steps, Path({str(tmp_path)!r}), echo=print)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE, text=True
    )
    log = tmp_path / "logs" / "slow.log"
    deadline = time.monotonic() + 120
    while "working on slow" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while not (tmp_path / "2.out.term").is_file():  # the orphan got SIGTERM, not left running
        assert time.monotonic() < deadline, "the step outlived the study"
        time.sleep(0.2)
    assert set(StudyState.load(tmp_path).finished) == {"first"}
    lines: list[str] = []
    quick = [steps[0], _fake_step("slow", tmp_path / "2.out")]
    assert run_steps(quick, tmp_path, echo=lines.append) == 1
    assert "done earlier  first" in lines[0] and lines[1].endswith("slow")


# --------------------------------------------------------------------------------------------
# The report, from hand-made result files
# --------------------------------------------------------------------------------------------


def _result(path: Path, label: str, per_task: dict[str, list[float]], demos: bool = True) -> None:
    seeds = [100, 13, 21]
    per_seed = {str(s): sum(v[i] for v in per_task.values()) / len(per_task)
                for i, s in enumerate(seeds)}  # fmt: skip
    raw = {
        "format": "maml-ds-eval",
        "label": label,
        "column": "synthetic (all)",
        "seeds": seeds,
        "options": {"use_demonstrations": demos},
        "per_seed": per_seed,
        "average": sum(per_seed.values()) / 3,
        "worst": min(per_seed.values()),
        "per_task": {
            t: {"seeds": {str(s): {"score": v[i]} for i, s in enumerate(seeds)}}
            for t, v in per_task.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))


def _report_plan(tmp_path: Path, scores: dict[tuple[str, str], dict[str, list[float]]]) -> Plan:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic_suite.json").write_text("{}")
    cfg = replace(preset_config("cpu"), out_dir=str(tmp_path), eval_seeds=(100, 13, 21))
    plan = Plan(cfg, tmp_path)
    for (label, baseline), per_task in scores.items():
        path = tmp_path / "eval" / f"{label}.json"
        _result(path, label, per_task, demos=baseline != "no-icl")
        ref = ResultRef(str(path), ("complete",), "synthetic", "all", "direct", label, baseline)
        plan.steps.append(Step(f"eval.{label}", "eval", ("maml-ds",), (str(path),), result=ref))
    return plan


def test_report_spread_margins_per_family_and_plain_findings(tmp_path):
    tasks = ("keyword_heldout_00", "keyword_unseen_00", "nli_heldout_00")
    plan = _report_plan(
        tmp_path,
        {
            ("No ICL", "no-icl"): dict.fromkeys(tasks, [0.3, 0.3, 0.3]),
            ("Raw LM", "raw-lm"): {tasks[0]: [0.8, 0.6, 0.7], tasks[1]: [0.6, 0.6, 0.6],
                                   tasks[2]: [0.3, 0.4, 0.5]},
            ("MetaICL", "none"): {tasks[0]: [0.7, 0.5, 0.6], tasks[1]: [0.6, 0.5, 0.6],
                                  tasks[2]: [0.3, 0.4, 0.5]},
        },
    )  # fmt: skip
    summary = gather(plan)
    assert [r.ref.label for r in summary.rows] == ["No ICL", "Raw LM", "MetaICL"]
    raw_lm = summary.rows[1].spread
    assert raw_lm.per_seed == pytest.approx({100: 1.7 / 3, 13: 1.6 / 3, 21: 1.8 / 3})
    assert raw_lm.min == pytest.approx(1.6 / 3) and raw_lm.max == pytest.approx(0.6)
    assert raw_lm.std == pytest.approx(0.1 / 3)  # sample std of (1.7, 1.6, 1.8) / 3
    margins = {m.family: m.spread for m in summary.margins}
    assert margins["keyword"].per_seed == pytest.approx({100: -0.05, 13: -0.1, 21: -0.05})
    assert margins["nli"].per_seed == pytest.approx({100: 0.0, 13: 0.0, 21: 0.0})
    assert margins["overall"].average == pytest.approx(-0.4 / 9)
    assert summary.findings[:-1] == [
        "complete data: no meta-trained model beats Raw LM (its starting model); the best, "
        "MetaICL, is -4.44 points (x100) on average.",
        "complete data: no method beats Raw LM on keyword, nli.",
        "complete data: over No ICL (points x100, mean over columns): Raw LM +26.67, "
        "MetaICL +22.22.",
    ]
    assert summary.findings[-1].startswith("suite check (No ICL near chance) not run:")
    assert summary.win_rates["complete"]["Raw LM"]["MetaICL"].wins == 1
    record = summary.to_json(plan)
    assert record["results"][0]["std"] == 0.0 and record["missing"] == []
    png = write_png(summary, plan, tmp_path / "study.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_reads_validation_curves_when_runs_log_them(tmp_path):
    from maml_ds.study.report import validation_curves

    plan = _report_plan(tmp_path, {("Raw LM", "raw-lm"): {"keyword_heldout_00": [0.5, 0.5, 0.5]}})
    run = tmp_path / "runs" / "complete-synthetic-metaicl"
    run.mkdir(parents=True)
    curve = [{"step": 0, "val_score": 40.0, "val_nli": 30.0}, {"step": 5, "val_score": 45.0}]
    (run / "validation.json").write_text(json.dumps({"curve": curve, "best_step": 5}))
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    (broken / "validation.json").write_text('{"cur')  # a killed write: no curve
    for name, folder in (("x", run), ("y", tmp_path / "no"), ("z", broken)):
        plan.steps.append(
            Step(f"train.{name}", "train", ("maml-ds",), (name,), run_dir=str(folder))
        )
    assert validation_curves(plan) == {
        run.name: {"val_score": ([0, 5], [40.0, 45.0]), "val_nli": ([0], [30.0])}
    }
    summary = gather(plan)
    assert summary.findings[-1] == (
        "validation chose (RUN/best, what was evaluated): complete-synthetic-metaicl update 5 of 5."
    )
    assert write_png(summary, plan, tmp_path / "s.png").is_file()
