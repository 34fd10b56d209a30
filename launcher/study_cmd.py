"""`maml-ds study`: the paper's experiment grid as one resumable command (plan, run, gather).

Every step is an existing command run as a subprocess (`maml-ds launch`, `eval`, `adapt`);
this module resolves the StudyConfig, guards the study folder, prints progress and the tables.
docs/study.md.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from launcher.errors import err_console, fail
from launcher.eval_cmd import fitted_tables, out_console, paper_table, parse_seeds
from maml_ds.config import ConfigError
from maml_ds.files import write_atomic
from maml_ds.study import (
    PLAN_FILE,
    PNG_FILE,
    SUMMARY_FILE,
    Plan,
    StepFailed,
    StudyConfig,
    StudyInterrupted,
    StudyState,
    StudySummary,
    build_plan,
    command_line,
    gather,
    preset_config,
    read_plan,
    run_steps,
    step_argv,
    write_png,
)
from maml_ds.study.config import is_synthetic_suite
from maml_ds.study.report import OVERALL, PART_TITLES


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def resolve_config(name: str | None, out: Path | None, overrides: dict[str, Any]) -> StudyConfig:
    """The preset (default cpu) with the flags given; the saved config of `out` when neither a
    preset nor any setting is given and `out` holds a study."""
    saved = out / PLAN_FILE if out is not None else None
    if name is None and not overrides and saved is not None and saved.is_file():
        return _read_plan(saved).config
    cfg = preset_config(name or "cpu")
    data = overrides.get("data_dir")
    if data is not None and "tasks" not in overrides and not is_synthetic_suite(data):
        overrides = {**overrides, "tasks": "files", "copy_share": 0.0}  # real data: its files
    cfg = replace(cfg, out_dir=str(out) if out is not None else cfg.out_dir, **overrides)
    return cfg.validate()


def _read_plan(path: Path) -> Plan:
    try:
        return read_plan(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise fail(f"{path}: not a readable study plan ({err}); choose another --out") from None


def _check_folder(plan: Plan) -> Plan | None:
    """The plan saved in the study folder (None for a new folder); exit 2 for a folder that is
    not a study, or a study whose finished steps would change (unfinished ones may)."""
    out = plan.out_dir
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file: give a folder for the study")
    saved_path = out / PLAN_FILE
    if not saved_path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise fail(f"--out {out} is not empty and holds no {PLAN_FILE}: not a study folder")
        return None
    saved = _read_plan(saved_path)
    finished = StudyState.load(out).finished
    changed = [
        s.id for s in plan.steps if s.id in finished and finished[s.id]["argv"] != list(s.argv)
    ]
    if changed:
        shown = ", ".join(changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        )
        raise fail(
            f"{out} holds a study whose finished steps {shown} ran other commands: continue it "
            f"with `maml-ds study --out {out}` (its own settings), or choose another --out"
        )
    return saved


def _print_plan(plan: Plan) -> None:
    cfg = plan.config
    finished = StudyState.load(plan.out_dir) if (plan.out_dir / PLAN_FILE).is_file() else None
    typer.echo(
        f"study plan ({cfg.preset} preset): {len(plan.steps)} steps in {plan.out_dir}; "
        f"parts {', '.join(cfg.parts)}; settings {', '.join(cfg.settings)}; "
        f"seeds {','.join(map(str, cfg.eval_seeds))}"
    )
    width = len(str(len(plan.steps)))
    for i, step in enumerate(plan.steps, start=1):
        done = finished is not None and finished.is_finished(step)
        typer.echo(f"[{i:>{width}}/{len(plan.steps)}] {step.id}{'  (done)' if done else ''}")
        typer.echo(f"    {command_line(step_argv(step))}")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        typer.echo(f"note: the data folder {cfg.data_dir} does not exist yet (a run needs it)")


def print_report(summary: StudySummary, num_seeds: int) -> None:
    width = out_console.width
    for part in summary.parts():
        rows = [r for r in summary.rows if r.part == part]
        table_rows = [
            (r.ref.label, r.column, r.spread.average, r.spread.worst, r.seed_independent)
            for r in rows
        ]
        title = f"{PART_TITLES[part]}: average/worst over {num_seeds} seeds (x100)"
        tables = paper_table(table_rows, title, width)
        labels = list(summary.win_rates[part])
        win_rows = []
        for a in labels:
            cells = []
            for b in labels:
                w = summary.win_rates[part][a].get(b)
                cells.append(
                    "" if w is None else "-" if w.num_settings == 0
                    else f"{w.wins}/{w.num_settings} ({w.rate:.2f})"
                )  # fmt: skip
            win_rows.append(([a], cells))
        tables += fitted_tables(
            f"{PART_TITLES[part]}: win rate of row over column (higher average AND worst)",
            [""], labels, win_rows, width=width,
        )  # fmt: skip
        margins = [m for m in summary.margins if m.part == part]
        if margins:
            families = [OVERALL, *dict.fromkeys(m.family for m in margins if m.family != OVERALL)]
            by_key = {(m.label, m.family): m for m in margins}
            margin_rows = [
                ([label], [_margin_cell(by_key.get((label, f))) for f in families])
                for label in dict.fromkeys(m.label for m in margins)
            ]
            tables += fitted_tables(
                f"{PART_TITLES[part]}: margin over Raw LM (x100), mean±std over seeds",
                ["Method"], families, margin_rows, width=width,
            )  # fmt: skip
        for table in tables:
            out_console.print(table)
    if summary.margins:
        out_console.print("(margins: min/max per seed in summary.json)", highlight=False)
    for line in summary.findings:
        out_console.print(line, highlight=False)
    if summary.missing:
        out_console.print(f"{len(summary.missing)} planned result(s) missing", highlight=False)


def _margin_cell(margin: Any) -> str:
    if margin is None:
        return ""
    return f"{100 * margin.spread.average:+.2f}±{100 * margin.spread.std:.2f}"


def _gather_and_write(plan: Plan) -> None:
    try:
        summary = gather(plan)
    except (OSError, ValueError, KeyError) as err:
        raise fail(f"cannot read the study's results: {err}") from None
    path = plan.out_dir / SUMMARY_FILE
    write_atomic(path, json.dumps(summary.to_json(plan), indent=1) + "\n")
    print_report(summary, len(plan.config.eval_seeds))
    try:
        png = write_png(summary, plan, plan.out_dir / PNG_FILE)
        err_console.print(f"wrote {path} and {png}", highlight=False)
    except ImportError:
        err_console.print(
            f"wrote {path}; no PNG: matplotlib is missing (pip install 'maml-ds[plot]')",
            highlight=False,
        )


def study_command(
    preset: Annotated[
        str | None, typer.Option(help="cpu | quick | paper (default: cpu, or the folder's own)")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="the quick preset (CI)")] = False,
    out: Annotated[
        Path | None, typer.Option(help="study folder (default studies/PRESET); rerun to continue")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="MetaICL data folder (default: the synthetic suite)")
    ] = None,
    starting_model: Annotated[
        str | None, typer.Option(help="the model every method starts from and baselines score")
    ] = None,
    pretrain_steps: Annotated[
        int | None,
        typer.Option(help="copy pre-training updates of a built-in starting model (0: none)"),
    ] = None,
    prompt_format: Annotated[
        str | None, typer.Option("--format", help="newlines | spaces: every training and eval")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="fresh (synthetic tasks per prompt) | files")
    ] = None,
    parts: Annotated[str | None, typer.Option(help="complete,limited,adapt,ablation")] = None,
    settings: Annotated[str | None, typer.Option(help="settings, comma-separated")] = None,
    methods: Annotated[
        str | None, typer.Option(help="e.g. metaicl,maml-2-1,maml-2-4,fomaml-2-1")
    ] = None,
    variants: Annotated[str | None, typer.Option(help="direct,channel")] = None,
    scopes: Annotated[str | None, typer.Option(help="all,unseen (Table 3, Table 2)")] = None,
    seeds: Annotated[str | None, typer.Option(help="evaluation seeds, comma-separated")] = None,
    launch_preset: Annotated[
        str | None, typer.Option(help="`maml-ds launch --preset` of every training")
    ] = None,
    nodes: Annotated[int | None, typer.Option(help="`launch --nodes`")] = None,
    gpus: Annotated[int | None, typer.Option(help="`launch --gpus` (CPU ranks on cpu)")] = None,
    hostfile: Annotated[Path | None, typer.Option(help="`launch --hostfile`")] = None,
    master_port: Annotated[int | None, typer.Option(help="`launch --master-port`")] = None,
    train_option: Annotated[
        list[str] | None, typer.Option(help="more `maml-ds train` options (repeatable)")
    ] = None,
    eval_option: Annotated[
        list[str] | None, typer.Option(help="more `maml-ds eval`/`adapt` options (repeatable)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print every command of the plan; write nothing")
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option(min=0, help="stop after N steps of this invocation")
    ] = None,
) -> None:
    """Run the paper's experiment grid (settings x methods x seeds) and print its tables.

    Examples: `maml-ds study` (the CPU study on the synthetic suite); `maml-ds study --preset
    paper --data data/metaicl --dry-run` (every command of the paper's Tables 2-5).
    """
    if quick and preset not in (None, "quick"):
        raise fail(f"--quick is the quick preset; drop --preset {preset} or --quick")
    overrides: dict[str, Any] = {}
    for key, value in (
        ("data_dir", str(data) if data is not None else None),
        ("starting_model", starting_model),
        ("pretrain_steps", pretrain_steps),
        ("prompt_format", prompt_format),
        ("tasks", tasks),
        ("parts", _csv(parts) if parts is not None else None),
        ("settings", _csv(settings) if settings is not None else None),
        ("methods", _csv(methods) if methods is not None else None),
        ("variants", _csv(variants) if variants is not None else None),
        ("scopes", _csv(scopes) if scopes is not None else None),
        ("launch_preset", launch_preset),
        ("nodes", nodes),
        ("gpus", gpus),
        ("hostfile", str(hostfile) if hostfile is not None else None),
        ("master_port", master_port),
        ("train_options", _split(train_option)),
        ("eval_options", _split(eval_option)),
    ):
        if value is not None:
            overrides[key] = value
    try:
        if seeds is not None:
            overrides["eval_seeds"] = parse_seeds(seeds)
        cfg = resolve_config("quick" if quick else preset, out, overrides)
    except ConfigError as err:
        raise fail(err.problems[0] if len(err.problems) == 1 else str(err)) from None
    plan = build_plan(cfg)
    saved = _check_folder(plan)
    if dry_run:
        _print_plan(plan)
        return
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise fail(f"--data {cfg.data_dir} does not exist (`maml-ds data build` writes one)")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if saved is None or saved.to_json() != plan.to_json():
        write_atomic(plan.out_dir / PLAN_FILE, json.dumps(plan.to_json(), indent=1) + "\n")
    rerun = f"maml-ds study --out {shlex.quote(str(plan.out_dir))}"
    try:
        run_steps(plan.steps, plan.out_dir, echo=typer.echo, stop_after=stop_after)
    except StepFailed as err:
        raise fail(
            f"step {err.step.id} {err.reason}; log: {err.log}; rerun it alone: {err.rerun}; "
            f"then continue the study: {rerun}",
            code=1,
        ) from None
    except StudyInterrupted as err:
        err_console.print(f"{err}; continue: {rerun}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.code) from None
    _gather_and_write(plan)


def _split(options: list[str] | None) -> tuple[str, ...] | None:
    if not options:
        return None
    return tuple(word for option in options for word in shlex.split(option))


if __name__ == "__main__":  # pragma: no cover - the command is registered in launcher/cli.py
    typer.run(study_command)
