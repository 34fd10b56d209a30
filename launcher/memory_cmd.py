"""`maml-ds memory`: the paper's memory formula beside maml-ds's per-GPU memory model.

The numbers come from `maml_ds.memory` (the component list is `maml_ds.memory.model`); this
module parses the flags, prints the rich tables, writes the JSON and the plot. docs/memory.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from maml_ds.config import ConfigError


def _gb(value: float | int | None) -> str:
    from maml_ds.memory import GB

    return "-" if value is None else f"{value / GB:.3f}"


GPU_CARDS: dict[str, float] = {"v100-16gb": 16.0, "v100-32gb": 32.0, "a100-80gb": 80.0}
"""The presets' cards (launcher/presets.py) and their memory, GB."""

# Which flag shrinks a row when it is the largest (partitioned rows: ZeRO-3, then more GPUs).
_PARTITIONED = {
    "parameters", "gradients", "fp32_master", "moments", "moment_snapshot",
    "meta_gradient_accumulator", "inner_state", "adapted_copy", "hvp_vectors", "fp32_gradients",
    "optimizer_scratch", "task_result", "meta_gradient_mean", "pass_gradient",
    "inner_step_scratch",
}  # fmt: skip


def _shrink(report) -> tuple[str, dict[str, object]] | None:
    """The flag that shrinks the largest row, and the setup change it makes."""
    s = report.setup
    largest = max(report.rows, key=lambda r: r.bytes)
    if largest.key == "activations":
        if not s.activation_checkpointing and (not s.is_maml or s.zero_stage == 3):
            return "--activation-checkpointing", {"activation_checkpointing": True}
        if s.attn_implementation == "eager":
            return "--attn sdpa", {"attn_implementation": "sdpa"}
        if s.micro_batch_size > 1:
            return "--micro-batch-size 1", {"micro_batch_size": 1}
        return None
    if largest.key == "reduce_bucket":
        return "--reduce-bucket-size", {"reduce_bucket_size": s.reduce_bucket_size // 10}
    if s.zero_stage < 3 and (largest.key in _PARTITIONED or largest.key.startswith("gather")):
        return "--zero 3", {"zero_stage": 3}
    return f"--gpus {2 * s.gpus_per_node}", {"gpus_per_node": 2 * s.gpus_per_node}


def print_summary(report, console: Console, preset: str | None = None) -> None:
    """The answer first: peak per GPU, which cards it fits, the largest term and its flag."""
    from dataclasses import replace

    from maml_ds.memory import GB, build_report

    s = report.setup
    peak = report.predicted_peak_bytes
    console.print(
        f"[bold]predicted peak per GPU: {peak / GB:.2f} GB[/] (phase: {report.peak_phase}; "
        f"the paper's {report.paper_formula}: {report.paper_bytes / GB:.2f} GB)",
        highlight=False,
    )
    cards = {preset: GPU_CARDS[preset]} if preset else GPU_CARDS
    fits = [
        f"{name} {'yes' if peak <= size * GB else 'NO'} ({100 * peak / (size * GB):.0f}%)"
        for name, size in cards.items()
    ]
    console.print("fits: " + ", ".join(fits), highlight=False)
    if report.host_bytes:
        kept = s.kept_support_gradients
        console.print(
            f"host memory per GPU (pinned): {report.host_bytes / GB:.2f} GB (moment snapshot"
            + (f", {kept} kept support gradient{'s' * (kept > 1)}" if kept else "")
            + ")",
            highlight=False,
        )
    largest = max(report.rows, key=lambda r: r.bytes)
    line = f"largest term: {largest.label} {largest.bytes / GB:.2f} GB"
    shrink = _shrink(report)
    if shrink is not None:
        flag, change = shrink
        smaller = build_report(report.model, replace(s, **change)).predicted_peak_bytes
        line += f"; {flag} gives {smaller / GB:.2f} GB per GPU"
    console.print(line, highlight=False)


def print_report(
    report, console: Console, *, breakdown: bool = True, preset: str | None = None
) -> None:
    """The header, the answer (`print_summary`), the full breakdown if asked, the measured
    rows and the notes."""
    from maml_ds.memory import PHASES

    s, m = report.setup, report.model
    console.print(
        f"[bold]{m.name}[/]: {m.num_params:,} parameters, S(theta) = "
        f"{_gb(report.s_theta_bytes)} GB in {s.precision} ({_gb(m.s_theta('fp32'))} GB fp32)  |  "
        f"{s.method}, ZeRO-{s.zero_stage}, {s.num_nodes} node(s) x {s.gpus_per_node} GPU(s), "
        f"seq {s.seq_len} x micro-batch {s.micro_batch_size}, attention {s.attn_implementation}"
        + (", activation checkpointing" if s.activation_checkpointing else "")
        + (f", second order {s.effective_second_order}" if s.is_maml else ""),
        highlight=False,
    )
    print_summary(report, console, preset)
    if not breakdown:
        _print_measured(report, console)
        return
    table = Table(title="maml-ds memory per GPU (GB = 1e9 bytes)", title_justify="left")
    table.add_column("component")
    table.add_column("phase")
    table.add_column("GB", justify="right")
    table.add_column("note", overflow="fold", max_width=70)
    for row in report.rows:
        if row.bytes == 0 and row.key != "meta_gradient_accumulator":
            continue
        if row.key == "meta_gradient_accumulator" and not s.is_maml:
            continue
        table.add_row(row.label, row.phase, _gb(row.bytes), row.note)
    table.add_section()
    for phase in PHASES:
        if report.phase_bytes[phase] or phase == "persistent":
            table.add_row(f"[dim]sum {phase}[/]", "", _gb(report.phase_bytes[phase]), "")
    table.add_row(
        "[bold]predicted peak[/]",
        report.peak_phase,
        f"[bold]{_gb(report.predicted_peak_bytes)}[/]",
        "persistent + the largest transient phase (a row can be alive in several phases)",
    )
    table.add_row(
        "model states",
        "",
        _gb(report.model_states_bytes),
        "the rows DeepSpeed's estimator counts",
    )
    table.add_row(
        "DeepSpeed estimate",
        "",
        _gb(report.deepspeed_estimate_bytes),
        "estimate_zero2/3_model_states_mem_needs (mixed precision, ZeRO-2/3 only)",
    )
    table.add_row(
        "paper formula",
        "",
        _gb(report.paper_bytes),
        f"{report.paper_formula} (no partitioning, no activations)",
    )
    console.print(table)
    if s.is_maml:
        vs = Table(title="memory vs number of tasks n (GB)", title_justify="left")
        vs.add_column("n", justify="right")
        vs.add_column("paper (n+2)*S", justify="right")
        vs.add_column("maml-ds peak per GPU", justify="right")
        for point in report.vs_num_tasks:
            vs.add_row(
                str(point["num_tasks"]), _gb(point["paper_bytes"]), _gb(point["maml_ds_bytes"])
            )
        console.print(vs)
    _print_measured(report, console)


def _print_measured(report, console: Console) -> None:
    s = report.setup
    if report.measured:
        meas = Table(
            title="measured vs predicted per rank (the model actually run)", title_justify="left"
        )
        columns = (
            "n", "method", "model", "ZeRO", "ranks", "precision", "measured GB",
            "predicted GB", "ratio", "paper GB", "counter",
        )  # fmt: skip
        for col in columns:
            left = col in ("method", "model", "counter")
            meas.add_column(col, justify="left" if left else "right")
        for r in report.measured:
            meas.add_row(
                str(r["num_tasks"]),
                r.get("method", s.method),
                f"{r['model']} ({r['num_params']:,})",
                str(r["zero_stage"]),
                str(r.get("world_size", 1)),
                r["precision"],
                _gb(r["measured_peak_bytes"]),
                _gb(r["predicted_peak_bytes"]),
                f"{r['ratio']:.3f}",
                _gb(r.get("paper_bytes")),
                r["counter"],
            )
        console.print(meas)
        paper = "(n+2)*S(theta)" if s.is_maml else "2*S(theta)"
        console.print(
            f"paper GB: the paper's {paper} for the model actually run, in the precision run",
            highlight=False,
        )
        notes = {r["note"] for r in report.measured if r.get("note")}
        for note in sorted(notes):
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def write_plot(report, path: Path) -> None:
    """Memory vs number of tasks: the paper's (n+2)*S(theta) and maml-ds's per-GPU peak."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            ["--plot needs matplotlib, maml-ds's optional `plot` extra: pip install matplotlib"]
        ) from None
    from maml_ds.memory import GB, MemorySetup, build_report

    s = report.setup
    ns = [p["num_tasks"] for p in report.vs_num_tasks]
    spec = s.method_spec
    if spec.kind == "maml":
        paper = [p["paper_bytes"] / GB for p in report.vs_num_tasks]
        label = f"paper: (n+2) x S(theta), {s.precision}"
    else:
        paper = [report.paper_bytes / GB] * len(ns)
        label = "paper: 2 x S(theta) (MetaICL)"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, paper, "o--", label=label)
    ax.plot(
        ns,
        [p["maml_ds_bytes"] / GB for p in report.vs_num_tasks],
        "s-",
        label=f"maml-ds per GPU (ZeRO-{s.zero_stage}, {s.world_size} GPU)",
    )
    ax.plot(
        ns,
        [p["maml_ds_bytes_without_activations"] / GB for p in report.vs_num_tasks],
        "s:",
        label="maml-ds per GPU without activations",
    )
    if spec.kind == "maml":
        # MetaICL under the same setup, for reference
        metaicl = build_report(report.model, MemorySetup(**{**s.__dict__, "method": "metaicl"}))
        ax.axhline(
            metaicl.predicted_peak_bytes / GB, color="gray", lw=1, label="maml-ds MetaICL per GPU"
        )
    if report.measured:
        ax.plot(
            [r["num_tasks"] for r in report.measured],
            [r["measured_peak_bytes"] / GB for r in report.measured],
            "x",
            label=f"measured ({report.measured[0]['model']})",
        )
    ax.set_xlabel("tasks per meta-update n" if spec.kind == "maml" else "micro-batches per update")
    ax.set_ylabel("GB")
    ax.set_title(f"{report.model.name}, {s.method}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory(
    model: Annotated[
        str,
        typer.Option(help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | tiny | HF config folder"),
    ] = "gpt2-medium",
    method: Annotated[str, typer.Option(help="metaicl | maml-2k-n | fomaml-2k-n")] = "metaicl",
    nodes: Annotated[int, typer.Option(help="number of nodes")] = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per node")] = 1,
    zero: Annotated[int, typer.Option(help="ZeRO stage 0-3")] = 0,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | bf16")] = "fp32",
    seq_len: Annotated[int, typer.Option(help="tokens per prompt")] = 1024,
    micro_batch_size: Annotated[int, typer.Option(help="prompts per rank per pass")] = 1,
    second_order: Annotated[str, typer.Option(help="hvp-fd | first-order (MAML)")] = "hvp-fd",
    attn: Annotated[str, typer.Option(help="eager | sdpa")] = "eager",
    activation_checkpointing: Annotated[
        bool, typer.Option(help="recompute each layer's activations in the backward")
    ] = False,
    breakdown: Annotated[
        bool, typer.Option(help="print every component, phase and the curve over n")
    ] = False,
    preset: Annotated[
        str | None, typer.Option(help="the card to check: v100-16gb | v100-32gb | a100-80gb")
    ] = None,
    reduce_bucket_size: Annotated[int, typer.Option(help="DeepSpeed reduce bucket (elements)")] = (
        50_000_000
    ),
    keep_support_gradients: Annotated[
        int | None, typer.Option(help="hvp-fd, k >= 2: support gradients kept (default k - 1)")
    ] = None,
    adapted_rounding: Annotated[
        str, typer.Option(help="nearest | stochastic (MAML at 16 bits)")
    ] = "nearest",
    vocab_size: Annotated[int | None, typer.Option(help="vocabulary of the tiny built-ins")] = None,
    do_measure: Annotated[
        bool,
        typer.Option(
            "--measure",
            help="run real steps (MetaICL) or meta-updates (MAML) of a small model and compare",
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the report as JSON")
    ] = None,
    measure_tasks: Annotated[
        str, typer.Option(help="with --measure: the n values to measure, comma-separated")
    ] = "1,2,4,8",
    plot: Annotated[Path | None, typer.Option(help="PNG of memory vs number of tasks")] = None,
) -> None:
    """Per-GPU memory: the paper's formula and maml-ds's model (parameters, gradients, fp32
    master, shared moments, adapted copy, meta-gradient, activations)."""
    from launcher.errors import fail
    from maml_ds.memory import MeasurementUnavailable, MemorySetup, measure, memory_report

    console = Console(width=None if Console().is_terminal else 140)
    try:
        setup = MemorySetup(
            method=method,
            zero_stage=zero,
            precision=precision,  # type: ignore[arg-type]
            num_nodes=nodes,
            gpus_per_node=gpus,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            second_order=second_order,
            attn_implementation=attn,  # type: ignore[arg-type]
            activation_checkpointing=activation_checkpointing,
            reduce_bucket_size=reduce_bucket_size,
            keep_support_gradients=keep_support_gradients,
            adapted_rounding=adapted_rounding,  # type: ignore[arg-type]
        ).validate()
        if preset is not None and preset not in GPU_CARDS:
            raise ConfigError([f"--preset must be one of {', '.join(GPU_CARDS)}, got {preset!r}"])
        report = memory_report(model, setup, vocab_size=vocab_size)
        num_tasks = _parse_tasks(measure_tasks)
        if do_measure:
            from maml_ds import distributed as D

            try:
                report.measured = measure(setup, num_tasks)
            except MeasurementUnavailable as err:
                report.measure_error = str(err)
            finally:
                D.shutdown()
        if plot is not None:
            write_plot(report, plot)
    except ConfigError as err:
        raise fail(str(err)) from None
    print_report(report, console, breakdown=breakdown, preset=preset)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if plot is not None:
        console.print(f"wrote {plot}")
    if report.measure_error is not None:
        # The prediction above stands; the measurement was asked for and could not run.
        raise fail(f"--measure did not run: {report.measure_error}")


def _parse_tasks(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ConfigError(
            [f"--measure-tasks must be positive integers, e.g. 1,2,4,8; got {text!r}"]
        )
    return values
