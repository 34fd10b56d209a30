"""`maml-ds data ...`: data utilities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from launcher.errors import err_console as console

data_app = typer.Typer(
    help="Data utilities (the offline synthetic task suite).", no_args_is_help=True
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
