"""`maml-ds plot RUN...`: the loss curves of one or several runs (RUN/history.jsonl) in a PNG.

matplotlib is the `plot` extra (`pip install 'maml-ds[plot]'`). docs/launch.md ("Logs").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from launcher.errors import err_console as console
from launcher.errors import fail

HISTORY = "history.jsonl"


def read_curve(run: Path, metric: str) -> tuple[list[int], list[float]]:
    """(updates, values) of `metric` in a run's history; a typer.Exit (named problem) if absent."""
    path = run / HISTORY
    if not path.is_file():
        raise fail(f"{run}: no {HISTORY} (not a maml-ds run, or it has not finished an update)")
    steps, values = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if metric in record:
            steps.append(int(record["step"]))
            values.append(float(record[metric]))
    if not steps:
        raise fail(f"{path} has no {metric!r} values (MAML runs also log support_loss, query_loss)")
    return steps, values


def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="run folders (each with history.jsonl)")],
    out: Annotated[Path, typer.Option(help="the PNG to write")] = Path("loss.png"),
    metric: Annotated[
        list[str] | None,
        typer.Option(help="history field to draw, repeatable (default: loss)"),
    ] = None,
) -> None:
    """Draw the loss curves of one or several runs into a PNG.

    Example: maml-ds plot runs/metaicl runs/maml-2-4 --out loss.png
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise fail("plot needs matplotlib: pip install 'maml-ds[plot]'") from None
    metrics = metric or ["loss"]
    curves = [(run, name, *read_curve(run, name)) for run in runs for name in metrics]
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, name, steps, values in curves:
        label = run.resolve().name if len(metrics) == 1 else f"{run.resolve().name} {name}"
        ax.plot(steps, values, label=label)
    ax.set_xlabel("update")
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    console.print(f"wrote {out} ({len(curves)} curve(s))", highlight=False, soft_wrap=True)
