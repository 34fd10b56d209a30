"""`maml-ds eval`, `maml-ds compare`, `maml-ds adapt`: parse, validate, call maml_ds, print.

Registered in launcher/cli.py. Heavy imports (torch, transformers) happen inside the commands so
that `maml-ds --help` stays fast. This module does not import launcher.cli (cli imports it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from launcher.errors import err_console, fail, user_error
from maml_ds.config import ConfigError

if TYPE_CHECKING:  # imported by the commands themselves: `maml-ds --help` stays fast
    from maml_ds.eval import EvalOptions
    from maml_ds.model_io import LoadedModel

out_console = Console()


def parse_seeds(text: str) -> tuple[int, ...]:
    """ "100,13,21" -> (100, 13, 21)."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            [f"--seeds must be comma-separated integers, e.g. 100,13,21,42,87; got {text!r}"]
        ) from None
    return seeds


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _cell(average: float, worst: float, single: bool) -> str:
    """The paper's "X/Y" (average/worst), or one number when seeds cannot matter."""
    return _pct(average) if single else f"{_pct(average)}/{_pct(worst)}"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


METRIC_ABBREVIATIONS = {"macro-f1": "F1", "accuracy": "acc"}


def fitted_tables(
    title: str,
    key_headers: Sequence[str],
    value_headers: Sequence[str],
    rows: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    width: int,
    caption: str | None = None,
) -> list[Table]:
    """Tables that fit `width` columns without cutting a cell: the value columns (numbers,
    never wrapped) are folded into as many blocks as needed, each repeating the key columns
    (row names, folded onto a second line only if they alone exceed the width).

    rows: (key cells, value cells). Value headers break at their spaces.
    """
    console = Console(width=width)
    unbounded = console.options.update(max_width=1_000_000)

    def build(columns: Sequence[int], block_title: str) -> Table:
        table = Table(
            title=block_title,
            min_width=min(len(block_title), width) if block_title == title else None,
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
            pad_edge=False,
            show_edge=False,
        )
        for header in key_headers:
            table.add_column(header, overflow="fold")
        for i in columns:
            table.add_column("\n".join(value_headers[i].split()), justify="right", no_wrap=True)
        for keys, values in rows:
            table.add_row(*keys, *[values[i] for i in columns])
        return table

    blocks: list[list[int]] = []
    for i in range(len(value_headers)):
        if (
            blocks
            and Measurement.get(console, unbounded, build([*blocks[-1], i], "")).maximum <= width
        ):
            blocks[-1].append(i)
        else:
            blocks.append([i])
    tables = [
        build(columns, title if n == 0 else "(continued)")
        for n, columns in enumerate(blocks or [[]])
    ]
    tables[-1].caption = caption
    return tables


def per_task_table(result: Any, width: int) -> list[Table]:
    """Task rows: the task's average/worst (x100), then one column per seed."""
    seeds = list(result.options.seeds)
    rows = []
    metrics = set()
    for task in result.tasks:
        by_seed = result.per_task[task]
        scores = [by_seed[s].score for s in seeds]
        metrics.add(by_seed[seeds[0]].metric)
        rows.append(
            (
                [task, METRIC_ABBREVIATIONS[by_seed[seeds[0]].metric]],
                [
                    _cell(sum(scores) / len(scores), min(scores), len(seeds) == 1),
                    *[_pct(v) for v in scores],
                ],
            )
        )
    agg = result.aggregate
    rows.append(
        (
            ["[bold]mean over tasks", ""],
            [
                f"[bold]{_cell(agg.average, agg.worst, len(seeds) == 1)}",
                *[_pct(agg.per_seed[s]) for s in seeds],
            ],
        )
    )
    legend = ", ".join(f"{METRIC_ABBREVIATIONS[m]}: {m}" for m in sorted(metrics))
    return fitted_tables(
        f"{result.label} on {result.column}: per task (x100)",
        ["task", "metric"],
        ["avg/worst", *(f"seed {s}" for s in seeds)],
        rows,
        width=width,
        caption=legend,
    )


def paper_table(
    rows: Sequence[tuple[str, str, float, float, bool]], title: str, width: int
) -> list[Table]:
    """The paper's layout: methods as rows, settings as columns, "average/worst" cells.

    rows: (label, column, average, worst, single) in display order.
    """
    columns = list(dict.fromkeys(r[1] for r in rows))
    labels = list(dict.fromkeys(r[0] for r in rows))
    cells = {(r[0], r[1]): _cell(r[2], r[3], r[4]) for r in rows}
    return fitted_tables(
        title,
        ["Method"],
        columns,
        [([label], [cells.get((label, c), "") for c in columns]) for label in labels],
        width=width,
    )


def _print_tables(tables: Sequence[Table]) -> None:
    for table in tables:
        out_console.print(table)


# --------------------------------------------------------------------------------------------
# What eval and adapt share: options, the model, the defaults a run provides
# --------------------------------------------------------------------------------------------


@contextmanager
def _user_errors() -> Iterator[None]:
    """A bad flag or bad data: one error line (from rank 0 only when sharded) and exit code
    2, no traceback."""
    from maml_ds.data.tasks import DataError
    from maml_ds.distributed import is_main

    try:
        yield
    except (ConfigError, DataError) as err:
        raise (user_error(err) if is_main() else typer.Exit(2)) from None


@dataclass(frozen=True)
class _Target:
    """A loaded model with everything its evaluation needs, defaults filled from its run."""

    loaded: LoadedModel
    data_dir: Path
    setting: str
    options: EvalOptions
    """The variant resolved."""
    label: str
    out_dir: Path
    cache_dir: Path | None


def _load_target(
    *,
    model: str,
    tokenizer: str | None,
    data: Path | None,
    setting: str | None,
    variant: str | None,
    device: str | None,
    options: EvalOptions,
    label: str | None,
    out: Path | None,
    no_cache: bool,
    kind: str,
) -> _Target:
    """Load the model; data, setting and variant default to its run's, the label to the
    paper's row name, the output folder to RUN/eval or eval/<model>."""
    from maml_ds.distributed import is_main
    from maml_ds.eval import default_label
    from maml_ds.eval.results import safe_name
    from maml_ds.eval.shard import init_ranks
    from maml_ds.model_io import load_model

    loaded = load_model(model, tokenizer=tokenizer, device=init_ranks(device))
    cfg = loaded.run_config
    problems = []
    if data is None:
        if cfg is None:
            problems.append("--data is required (the MetaICL-format data folder)")
        else:
            data = Path(cfg.data.data_dir)
    if setting is None:
        if cfg is None:
            problems.append("--setting is required (e.g. hr_to_lr, or synthetic)")
        else:
            setting = cfg.data.setting
    if variant is None:
        variant = cfg.data.variant if cfg is not None else "direct"
    elif cfg is not None and variant != cfg.data.variant and is_main():
        err_console.print(
            f"[yellow]note:[/] scoring with --variant {variant}; the run was trained "
            f"{cfg.data.variant}",
            highlight=False,
        )
    if problems:
        raise ConfigError(problems)
    assert data is not None and setting is not None
    if out is None:
        run_dir = loaded.run_dir
        out = Path(run_dir) / "eval" if run_dir is not None else Path("eval") / safe_name(model)
    options = replace(options, variant=variant)
    if options.separators == "auto" and cfg is not None and options.baseline == "none":
        options = replace(options, separators=cfg.data.format)  # the layout it was trained on
    label = label or default_label(
        baseline=options.baseline,
        variant=variant,
        train_method=cfg.method if cfg else None,
        model_name=model,
        kind=kind,
    )
    return _Target(loaded, data, setting, options, label, out, None if no_cache else out / "cache")


def _save_and_print(result: Any, path: Path) -> None:
    """Rank 0 writes the result and prints; the other ranks of a sharded run stay silent."""
    from maml_ds.distributed import is_main, world_size

    if not is_main():
        return
    path = result.save(path)
    single = len(result.options.seeds) == 1 or not result.options.use_demonstrations
    width = out_console.width
    _print_tables(per_task_table(result, width))
    agg = result.aggregate
    summary = [(result.label, result.column, agg.average, agg.worst, single)]
    _print_tables(paper_table(summary, "average/worst over seeds (x100)", width))
    num_cached = sum(r.cached for by_seed in result.per_task.values() for r in by_seed.values())
    num_pairs = sum(len(by_seed) for by_seed in result.per_task.values())
    ranks = f" on {world_size()} ranks" if world_size() > 1 else ""
    err_console.print(
        f"{num_pairs - num_cached} (task, seed) computed, {num_cached} from the cache; "
        f"{result.stats.num_forward_tokens} tokens through the model in "
        f"{result.stats.seconds:.1f} s; wall {result.wall_seconds:.1f} s{ranks}; "
        f"results: {path}",
        highlight=False,
        soft_wrap=True,
    )


ModelOpt = Annotated[
    str, typer.Option(help="run folder, checkpoint folder, HF model folder, built-in or HF id")
]
DataOpt = Annotated[
    Path | None, typer.Option(help="MetaICL-format data folder (default: the run's)")
]
SettingOpt = Annotated[
    str | None, typer.Option(help="setting name or JSON path (default: the run's)")
]
VariantOpt = Annotated[
    str | None, typer.Option(help="direct | channel (default: the run's variant, else direct)")
]
SeedsOpt = Annotated[str, typer.Option(help="demonstration seeds, comma-separated")]
KOpt = Annotated[int, typer.Option(help="demonstrations: the k of the data files")]
OutOpt = Annotated[
    Path | None, typer.Option(help="results + cache folder (default: RUN/eval or eval/<model>)")
]
TokOpt = Annotated[str | None, typer.Option(help="tokenizer folder or HF id (override)")]
BatchOpt = Annotated[int, typer.Option(help="sequences per forward pass")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="auto | newlines | spaces (auto: spaces for baselines; a trained run's own "
        "--format; else newlines)",
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda if available)")]
LabelOpt = Annotated[str | None, typer.Option(help="row name in tables (default: from the run)")]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="recompute every (task, seed); write no cache")
]
LogEveryOpt = Annotated[
    int,
    typer.Option(min=1, help="stderr not a terminal: a progress line every N (task, seed) pairs"),
]
LogSecondsOpt = Annotated[float, typer.Option(min=0.0, help="... and at least every T seconds")]


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def eval_command(
    model: ModelOpt,
    data: DataOpt = None,
    setting: SettingOpt = None,
    variant: VariantOpt = None,
    seeds: SeedsOpt = "100,13,21,42,87",
    unseen_only: Annotated[
        bool, typer.Option("--unseen-only", help="only the setting's unseen-domain tasks")
    ] = False,
    k: KOpt = 16,
    out: OutOpt = None,
    baseline: Annotated[
        str, typer.Option(help="none | no-icl (no demonstrations) | raw-lm (space format)")
    ] = "none",
    tokenizer: TokOpt = None,
    batch_size: BatchOpt = 16,
    separators: FormatOpt = "auto",
    label: LabelOpt = None,
    full_scoring: Annotated[
        bool,
        typer.Option(
            "--full-scoring", help="score every prompt in full, no KV cache (slower, same result)"
        ),
    ] = False,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = None,
    log_every: LogEveryOpt = 10,
    log_seconds: LogSecondsOpt = 60.0,
) -> None:
    """Evaluate a model with the MetaICL protocol: avg/worst over seeds, JSON + tables."""
    from maml_ds.distributed import shutdown
    from maml_ds.eval import EvalOptions, evaluate
    from maml_ds.eval.progress import ProgressOptions
    from maml_ds.eval.results import safe_name

    with _user_errors():
        options = EvalOptions(
            variant=variant or "direct",
            baseline=baseline,
            seeds=parse_seeds(seeds),
            k=k,
            unseen_only=unseen_only,
            separators=separators,
            batch_size=batch_size,
            use_kv_cache=not full_scoring,
        )  # validated before the model loads
        target = _load_target(
            model=model,
            tokenizer=tokenizer,
            data=data,
            setting=setting,
            variant=variant,
            device=device,
            options=options,
            label=label,
            out=out,
            no_cache=no_cache,
            kind="eval",
        )
        result = evaluate(
            target.loaded.model,
            target.loaded.tokenizer,
            data_dir=target.data_dir,
            setting=target.setting,
            options=target.options,
            label=target.label,
            model_name=model,
            cache_dir=target.cache_dir,
            progress_options=ProgressOptions(log_every, log_seconds),
        )
    options = target.options
    name = f"eval_{safe_name(result.setting)}_{options.scope}_{options.variant}_{baseline}_k{k}"
    _save_and_print(result, target.out_dir / f"{name}.json")
    shutdown()


# --------------------------------------------------------------------------------------------
# adapt
# --------------------------------------------------------------------------------------------


def adapt_command(
    model: ModelOpt,
    data: DataOpt = None,
    setting: SettingOpt = None,
    variant: VariantOpt = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-7)")] = 1e-7,
    steps: Annotated[int, typer.Option(help="steps, one target each (16 = one pass)")] = 16,
    keep: Annotated[
        Path | None, typer.Option(help="save the adapted weights here (KEEP/task/seedN/)")
    ] = None,
    seeds: SeedsOpt = "100,13,21,42,87",
    k: KOpt = 16,
    out: OutOpt = None,
    tokenizer: TokOpt = None,
    batch_size: BatchOpt = 16,
    separators: FormatOpt = "auto",
    label: LabelOpt = None,
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = None,
    log_every: LogEveryOpt = 10,
    log_seconds: LogSecondsOpt = 60.0,
) -> None:
    """Very few-shot adaptation (paper 5.4) on each unseen-domain task, then evaluation."""
    from maml_ds.distributed import shutdown
    from maml_ds.eval import AdaptOptions, EvalOptions, run_adaptation
    from maml_ds.eval.progress import ProgressOptions
    from maml_ds.eval.results import safe_name

    with _user_errors():
        adapt_options = AdaptOptions(lr=lr, steps=steps)
        options = EvalOptions(
            variant=variant or "direct",
            seeds=parse_seeds(seeds),
            k=k,
            unseen_only=True,
            separators=separators,
            batch_size=batch_size,
        )
        target = _load_target(
            model=model,
            tokenizer=tokenizer,
            data=data,
            setting=setting,
            variant=variant,
            device=device,
            options=options,
            label=label,
            out=out,
            no_cache=no_cache,
            kind="adapt",
        )
        result = run_adaptation(
            target.loaded.model,
            target.loaded.tokenizer,
            data_dir=target.data_dir,
            setting=target.setting,
            eval_options=target.options,
            adapt_options=adapt_options,
            label=target.label,
            model_name=model,
            cache_dir=target.cache_dir,
            keep_dir=keep,
            progress_options=ProgressOptions(log_every, log_seconds),
        )
    variant = target.options.variant
    name = f"adapt_{safe_name(result.setting)}_{variant}_lr{lr:g}_steps{steps}_k{k}"
    _save_and_print(result, target.out_dir / f"{name}.json")
    shutdown()


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def compare_command(
    results: Annotated[
        list[Path], typer.Argument(help="result JSON files of eval/adapt (or folders of them)")
    ],
    out: Annotated[Path | None, typer.Option(help="also write the tables as JSON here")] = None,
) -> None:
    """The paper's tables across settings: avg/worst per method, and pairwise win rates
    (A wins over B on a setting when both its average and its worst case are higher)."""
    import json

    from maml_ds.eval import iter_result_files, paper_order, read_result, win_rate

    with _user_errors():
        summaries = [read_result(p) for p in iter_result_files(results)]
        summaries.sort(key=lambda s: paper_order(s.label))  # stable: columns keep file order
    if not summaries:
        raise fail("no result files given (JSON written by `maml-ds eval` / `maml-ds adapt`)")
    seen: dict[tuple[str, str], Path] = {}
    for s in summaries:
        if (s.label, s.column) in seen:
            raise fail(
                f"two results for {s.label!r} on {s.column}: {seen[(s.label, s.column)]} and "
                f"{s.path}; give one of them another name with `maml-ds eval --label`"
            )
        seen[(s.label, s.column)] = s.path
    width = out_console.width
    _print_tables(
        paper_table(
            [(s.label, s.column, s.average, s.worst, s.seed_independent) for s in summaries],
            "average/worst over seeds (x100)",
            width,
        )
    )
    by_label: dict[str, dict[str, tuple[float, float]]] = {}
    for s in summaries:
        by_label.setdefault(s.label, {})[s.column] = (s.average, s.worst)
    labels = list(by_label)
    rows = []
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    for a in labels:
        cells = []
        for b in labels:
            if a == b:
                cells.append("")
                continue
            w = win_rate(by_label[a], by_label[b])
            matrix.setdefault(a, {})[b] = {
                "wins": w.wins,
                "settings": w.num_settings,
                "rate": w.rate,
            }
            cells.append(
                "-" if w.num_settings == 0 else f"{w.wins}/{w.num_settings} ({w.rate:.2f})"
            )
        rows.append(([a], cells))
    title = (
        "win rate of row over column (wins / settings both ran; "
        "win = higher average AND higher worst case)"
    )
    _print_tables(fitted_tables(title, [""], labels, rows, width=width))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "results": [
                {
                    "path": str(s.path),
                    "label": s.label,
                    "column": s.column,
                    "average": s.average,
                    "worst": s.worst,
                }
                for s in summaries
            ],
            "win_rate": matrix,
        }
        out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        err_console.print(f"wrote {out}", highlight=False)
