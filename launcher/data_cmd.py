"""`maml-ds data ...`: data utilities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from launcher.errors import err_console as console
from launcher.errors import fail

data_app = typer.Typer(
    help="Data: import your own task, build MetaICL's, check a folder, the synthetic suite.",
    no_args_is_help=True,
)


# --------------------------------------------------------------------------------------------
# data synth
# --------------------------------------------------------------------------------------------


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="folder to write the suite into")],
    seed: Annotated[int, typer.Option(help="suite seed (same seed, same bytes)")] = 0,
) -> None:
    """Write the synthetic in-context-learning suite in the MetaICL format."""
    from maml_ds.data.synth import write_synthetic_suite

    summary = write_synthetic_suite(out, seed=seed)
    console.print(f"wrote the synthetic suite to {out}: {summary}")


# --------------------------------------------------------------------------------------------
# shared by import, build and check
# --------------------------------------------------------------------------------------------


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        seeds = ()
    if not seeds:
        raise typer.BadParameter(f"comma-separated integers, e.g. 100,13,21,42,87; got {text!r}")
    return seeds


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


SeedsOption = Annotated[
    str, typer.Option(help="demonstration seeds, comma-separated (MetaICL's five)")
]
KOption = Annotated[int, typer.Option(help="demonstrations per seed: the k of the file names")]


# --------------------------------------------------------------------------------------------
# data import
# --------------------------------------------------------------------------------------------


@data_app.command("import")
def data_import(
    source: Annotated[
        str,
        typer.Argument(
            help="CSV/TSV/JSONL/Parquet file, saved Hugging Face dataset folder, or hf:ID "
            "(a hub dataset, downloaded)"
        ),
    ],
    task: Annotated[str, typer.Option(help="task name (folder and file prefix)")],
    out: Annotated[Path, typer.Option(help="data folder to write into")],
    input_template: Annotated[
        str, typer.Option("--input", help="input template over fields, e.g. '{q1} [SEP] {q2}'")
    ],
    label: Annotated[str, typer.Option(help="field holding the label (or the answer)")],
    label_map: Annotated[
        str | None,
        typer.Option(help="stored label value -> output, e.g. '-1=negative,0=no_impact'"),
    ] = None,
    options: Annotated[
        str | None,
        typer.Option(help="labels, comma-separated (default: the task config, else the labels)"),
    ] = None,
    options_field: Annotated[
        str | None,
        typer.Option(help="multi-choice: the field with each row's options (a.b: nested)"),
    ] = None,
    option_keys_field: Annotated[
        str | None,
        typer.Option(help="multi-choice: the field with the options' keys, when the label is one"),
    ] = None,
    test: Annotated[
        str | None,
        typer.Option(help="the test rows' source (default: hold out 20%, seed 42, as MetaICL)"),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="dataset split of the training rows (default: train)")
    ] = None,
    test_split: Annotated[
        str | None, typer.Option(help="dataset split of the test rows (e.g. validation)")
    ] = None,
    hf_config: Annotated[
        str | None, typer.Option(help="the Hugging Face dataset's config name")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="column names of a CSV/TSV file without a header line")
    ] = None,
    meta_train: Annotated[
        bool,
        typer.Option(help="a meta-training task: only _train, up to k lines (k 16384, seed 100)"),
    ] = False,
    k: Annotated[
        int | None, typer.Option(help="demonstrations per seed: the k of the file names [16]")
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="demonstration seeds, comma-separated [100,13,21,42,87]")
    ] = None,
) -> None:
    """Import your own task: rows -> MetaICL files for k and every seed, and a task config."""
    from maml_ds.data.importer import (
        TaskRecipe,
        import_task,
        load_source,
        load_splits,
        parse_label_map,
    )
    from maml_ds.data.reader import META_TRAIN_K, META_TRAIN_SEED
    from maml_ds.data.tasks import DataError

    try:
        recipe = TaskRecipe(
            task=task,
            input_template=input_template,
            label_field=label,
            label_map=parse_label_map(label_map),
            options=None if options is None else tuple(_names(options) or ()),
            options_field=options_field,
            option_keys_field=option_keys_field,
        )
        column_names = _names(columns)
        if test is None and test_split is not None:  # both splits of one dataset, loaded once
            train_rows, test_rows = load_splits(
                source, [split, test_split], config=hf_config, columns=column_names
            )
        else:
            train_rows = load_source(source, split=split, config=hf_config, columns=column_names)
            test_rows = None
            if test is not None:
                test_rows = load_source(
                    test, split=test_split, config=hf_config, columns=column_names
                )
        if k is None:
            k = META_TRAIN_K if meta_train else 16
        default_seeds = str(META_TRAIN_SEED) if meta_train else "100,13,21,42,87"
        summary = import_task(
            train_rows,
            recipe,
            out,
            test=test_rows,
            k=k,
            seeds=_seeds(seeds or default_seeds),
            meta_train=meta_train,
        )
    except DataError as e:
        raise fail(str(e)) from None
    console.print(summary.describe(), highlight=False)
    console.print(f"wrote {len(summary.files)} files to {out}")


# --------------------------------------------------------------------------------------------
# data build
# --------------------------------------------------------------------------------------------


def _print_registry(setting_name: str | None) -> None:
    from rich.table import Table

    from maml_ds.data.registry import REGISTRY, registered_tasks
    from maml_ds.data.tasks import load_setting

    tasks = list(REGISTRY)
    title = f"{len(tasks)} tasks with a registry entry"
    if setting_name is not None:
        setting = load_setting(setting_name)
        tasks = registered_tasks(setting)
        order = setting.unseen_domain_test + setting.test + setting.train
        missing = [t for t in dict.fromkeys(order) if t not in REGISTRY]
        title = f"{setting.name}: {len(tasks)} of {len(setting.all_tasks())} tasks have an entry"
    table = Table(title=title)
    for column in ("task", "dataset", "config", "train / test split", "note"):
        table.add_column(column)
    for task in tasks:
        e = REGISTRY[task]
        splits = f"{e.train_split} / {e.test_split or '20% held out'}"
        table.add_row(task, e.dataset, e.config or "", splits, e.note)
    Console().print(table)
    if setting_name is not None and missing:
        Console().print(f"no entry yet (use `maml-ds data import`): {', '.join(missing)}")


@data_app.command("build")
def data_build(
    out: Annotated[Path, typer.Option(help="data folder to write into")] = Path("data/metaicl"),
    setting: Annotated[
        str | None,
        typer.Option(help="setting name or JSON path: build its registered tasks"),
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="tasks to build, comma-separated (default: the setting's)")
    ] = None,
    meta_train: Annotated[
        bool, typer.Option(help="build --tasks as meta-training tasks (k=16384, seed 100)")
    ] = False,
    test_only: Annotated[
        bool, typer.Option(help="with --setting: only its target (test) tasks")
    ] = False,
    source: Annotated[
        list[str] | None,
        typer.Option(help="TASK=PATH: a local dataset folder (save_to_disk) instead of the hub"),
    ] = None,
    list_tasks: Annotated[
        bool, typer.Option("--list", help="show the tasks that have a registry entry and exit")
    ] = False,
    force: Annotated[bool, typer.Option(help="rebuild tasks that are already complete")] = False,
    k: KOption = 16,
    seeds: SeedsOption = "100,13,21,42,87",
) -> None:
    """Build MetaICL's tasks from their Hugging Face datasets (downloads; a rerun resumes).

    With --setting: its target tasks at --k/--seeds, then its training tasks as meta-training
    files (k=16384, seed 100), unseen-domain tasks first.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from maml_ds.data.reader import META_TRAIN_K, META_TRAIN_SEED
    from maml_ds.data.registry import build_tasks, registered_tasks
    from maml_ds.data.tasks import DataError, load_setting

    try:
        if list_tasks:
            _print_registry(setting)
            return
        target_seeds = _seeds(seeds)
        names = _names(tasks)
        if names is not None:
            jobs = [(names, meta_train)]
        elif setting is not None:
            loaded = load_setting(setting)
            ordered = registered_tasks(loaded)
            jobs = [([t for t in ordered if t in loaded.test], False)]
            if not test_only:
                jobs.append(([t for t in ordered if t in loaded.train], True))
        else:
            raise DataError("name the tasks to build: --setting S and/or --tasks a,b")
        sources = {}
        for item in source or []:
            task, sep, path = item.partition("=")
            if not sep or not task or not path:
                raise DataError(f"--source {item!r}: expected TASK=PATH")
            sources[task] = path
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as progress:
            bars: dict[str, int] = {}

            def on_task(task: str, status: str) -> None:
                line = {
                    "start": "loading and writing",
                    "built": "built",
                    "skipped": "complete already, skipped",
                }.get(status, "[red]failed[/]")
                if status in ("start", "skipped"):
                    bars[task] = progress.add_task(f"{task}: {line}", total=1)
                progress.update(
                    bars[task], description=f"{task}: {line}", completed=status != "start"
                )

            results = []
            for job_tasks, job_meta_train in jobs:
                results.append(
                    build_tasks(
                        job_tasks,
                        out,
                        k=META_TRAIN_K if job_meta_train else k,
                        seeds=(META_TRAIN_SEED,) if job_meta_train else target_seeds,
                        sources={t: p for t, p in sources.items() if t in job_tasks},
                        meta_train=job_meta_train,
                        force=force,
                        on_task=on_task,
                    )
                )
    except DataError as e:
        raise fail(str(e)) from None
    failed = {task: why for r in results for task, why in r.failed.items()}
    for r in results:
        for summary in r.built.values():
            console.print(summary.describe(), highlight=False)
    console.print(
        f"{out}: {sum(len(r.built) for r in results)} built, "
        f"{sum(len(r.skipped) for r in results)} already complete, {len(failed)} failed"
    )
    if failed:
        for task, why in failed.items():
            console.print(f"[red]{task}[/]: {why}", highlight=False, soft_wrap=True)
        raise fail(f"{len(failed)} task(s) failed; rerun the same command to retry them", code=1)


# --------------------------------------------------------------------------------------------
# data check
# --------------------------------------------------------------------------------------------


@data_app.command("check")
def data_check(
    data_dir: Annotated[Path, typer.Argument(help="MetaICL-format data folder")],
    setting: Annotated[str, typer.Option(help="setting name or JSON path")],
    k: KOption = 16,
    seeds: SeedsOption = "100,13,21,42,87",
    test_only: Annotated[
        bool, typer.Option(help="check the target tasks only (an evaluation)")
    ] = False,
) -> None:
    """Check a data folder for a setting: every file present, parseable, outputs among options."""
    from rich.table import Table

    from maml_ds.data.check import check_setting

    report = check_setting(data_dir, setting, k=k, seeds=_seeds(seeds), include_train=not test_only)
    if report.test:
        table = Table(title=f"{report.setting}: target tasks in {data_dir} (k={k})")
        for column in ("task", "demonstrations per seed", "test lines", "demo/test overlap"):
            table.add_column(column)
        for task, counts in report.test.items():
            demos = ", ".join(f"{s}:{n}" for s, n in counts.num_demonstrations.items())
            table.add_row(task, demos, str(counts.num_test), str(counts.num_overlap))
        Console().print(table)
    if report.train:
        total = sum(c.num_train for c in report.train.values())
        Console().print(f"{len(report.train)} meta-training tasks, {total} lines")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if not report.ok:
        for problem in report.problems:
            console.print(f"[red]-[/] {problem}", highlight=False, soft_wrap=True)
        raise fail(f"{len(report.problems)} problem(s) in {data_dir} for setting {setting!r}")
    console.print(f"{data_dir}: ready for setting {report.setting!r}")
