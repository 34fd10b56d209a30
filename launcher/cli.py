"""The ``maml-ds`` command line (Typer). It parses, validates and calls the library."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="maml-ds",
    help="MAML-en-LLM and MetaICL meta-training of causal LMs on DeepSpeed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"maml-ds {version('maml-ds')}")
        raise typer.Exit()


@app.callback()
def _root(
    local_rank: Annotated[
        int | None,
        typer.Option("--local_rank", hidden=True, help="set by DeepSpeed's launcher; unused"),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version, exit"
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="print the traceback behind a user error (also MAML_DS_DEBUG=1)"
        ),
    ] = False,
) -> None:
    """MAML-en-LLM and MetaICL meta-training of causal LMs on DeepSpeed."""
    from launcher.errors import set_debug

    set_debug(debug)


# --------------------------------------------------------------------------------------------
# Commands registered from their own modules (one line each)
# --------------------------------------------------------------------------------------------
from launcher.config_flags import SectionedHelp  # noqa: E402
from launcher.data_cmd import data_app  # noqa: E402
from launcher.eval_cmd import adapt_command, compare_command, eval_command  # noqa: E402
from launcher.export_cmd import export_command  # noqa: E402
from launcher.launch import launch  # noqa: E402
from launcher.memory_cmd import memory  # noqa: E402
from launcher.plot_cmd import plot_command  # noqa: E402
from launcher.pretrain_cmd import pretrain_command  # noqa: E402
from launcher.study_cmd import study_command  # noqa: E402
from launcher.train_cmd import train_command  # noqa: E402

app.command("train", cls=SectionedHelp)(train_command)
app.command("pretrain", cls=SectionedHelp)(pretrain_command)
app.command("eval", cls=SectionedHelp)(eval_command)
app.command("adapt", cls=SectionedHelp)(adapt_command)
app.command("compare", cls=SectionedHelp)(compare_command)
app.command("launch", cls=SectionedHelp)(launch)
app.command("memory", cls=SectionedHelp)(memory)
app.command("export", cls=SectionedHelp)(export_command)
app.command("plot", cls=SectionedHelp)(plot_command)
app.command("study", cls=SectionedHelp)(study_command)
app.add_typer(data_app, name="data")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
