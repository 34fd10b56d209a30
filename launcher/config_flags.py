"""`maml-ds train` flags derived from the RunConfig tree: one option per field, defined once.

A field's flag is its name (``--max-steps``) unless SHORT_NAMES gives another; its help is the
field's docstring with the default; Literal types are choices, bools ``--x/--no-x``. Every flag
defaults to None, "not given", so a config file's value survives. Adding a setting is adding a
field with a docstring. See docs/launch.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_type_hints

import typer
from typer.core import TyperCommand

from maml_ds.config import ConfigError, RunConfig

SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "out_dir": ("--out",),
    "model.name": ("--model",),
    "data.data_dir": ("--data",),
    "data.num_demonstrations": ("--k",),
    "optim.lr": ("--lr", "--outer-lr"),
    "deepspeed.zero_stage": ("--zero",),
    "deepspeed.config_file": ("--deepspeed-config",),
}
"""Flags that are not their field's name (config key -> flag and aliases)."""


@dataclass(frozen=True)
class ConfigFlag:
    """One RunConfig field as a command-line option."""

    key: str
    """Dotted config key, e.g. ``data.num_demonstrations``."""
    names: tuple[str, ...]
    """The option's names, e.g. ``("--k",)``; the first names the Python parameter."""
    annotation: Any
    """The field's type."""
    default: Any
    help: str
    panel: str
    """The help section it is listed in: the config section it belongs to."""

    @property
    def param_name(self) -> str:
        return self.names[0].removeprefix("--").replace("-", "_")

    @property
    def is_bool(self) -> bool:
        return self.annotation is bool

    def parameter(self) -> inspect.Parameter:
        """The Typer parameter (default None) of this flag."""
        names = self.names
        if self.is_bool:
            names = tuple(f"{n}/--no-{n.removeprefix('--')}" for n in names)
        annotation = self.annotation
        if type(None) not in get_args(annotation):
            annotation = Union[annotation, None]  # noqa: UP007 - a runtime type, not a hint
        option = typer.Option(
            *names, help=self.help, show_default=False, rich_help_panel=self.panel
        )
        return inspect.Parameter(
            self.param_name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[annotation, option],
        )

    def apply(self, cfg: RunConfig, value: Any) -> None:
        *sections, name = self.key.split(".")
        target = cfg
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, value)


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each annotated field) of a dataclass."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _shown_default(value: Any, flag: str) -> str:
    if isinstance(value, bool):
        return flag if value else f"--no-{flag.removeprefix('--')}"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _help(doc: str, default: Any, names: tuple[str, ...], key: str) -> str:
    text = doc.replace("``", "")
    if names[0].removeprefix("--").replace("-", "_") != key.rsplit(".", 1)[-1]:
        text += f" (config key {key})"
    if default is not None:
        text += f" [default: {_shown_default(default, names[0])}]"
    return text


def config_flags(cls: type = RunConfig, prefix: str = "") -> list[ConfigFlag]:
    """One ConfigFlag per leaf field of the dataclass tree `cls`, in declaration order."""
    hints = get_type_hints(cls)
    docs = _field_docs(cls)
    summary = " ".join((cls.__doc__ or "").split()).rstrip(".")
    panel = f"{summary} ({prefix}*)" if prefix else "Run"
    flags: list[ConfigFlag] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            flags += config_flags(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        key = f"{prefix}{f.name}"
        names = SHORT_NAMES.get(key, ("--" + f.name.replace("_", "-"),))
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        doc = docs.get(f.name, "")
        flags.append(ConfigFlag(key, names, hint, default, _help(doc, default, names, key), panel))
    return flags


FLAGS: tuple[ConfigFlag, ...] = tuple(config_flags())
_names = [name for flag in FLAGS for name in flag.names]
assert len(_names) == len(set(_names)), f"two config fields share a flag: {sorted(_names)}"
assert set(SHORT_NAMES) <= {flag.key for flag in FLAGS}, "SHORT_NAMES names an unknown field"


def apply_flags(cfg: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """Set every flag given in `values` (parameter name -> value; None = not given) on cfg."""
    for flag in FLAGS:
        value = values.get(flag.param_name)
        if value is not None:
            flag.apply(cfg, value)
    return cfg


def with_config_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command(flags, **options)` as a Typer command taking its own options plus every flag.

    `flags` is {parameter name: value or None} of the config flags, for :func:`apply_flags`.
    """
    signature = inspect.signature(command, eval_str=True)
    own = list(signature.parameters.values())[1:]
    clash = {p.name for p in own} & {flag.param_name for flag in FLAGS}
    assert not clash, f"{command.__name__} options shadow config flags: {clash}"

    def run(**options: Any) -> Any:
        flags = {flag.param_name: options.pop(flag.param_name) for flag in FLAGS}
        return command(flags, **options)

    run.__name__, run.__qualname__ = command.__name__, command.__qualname__
    run.__doc__, run.__module__ = command.__doc__, command.__module__
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*own, *(flag.parameter() for flag in FLAGS)]
    )
    return run


class SectionedHelp(TyperCommand):
    """Click's plain help with one section per config section (rich's panels cut long flag
    names at 80 columns)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "rich_markup_mode": None})

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = getattr(param, "rich_help_panel", None) or "Options"
                sections.setdefault(title, []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


def parse_options(command: Callable[..., Any], name: str, args: list[str]) -> dict[str, Any]:
    """The parameters Typer would call `command` with for `args`; nothing runs.

    Raises ConfigError with Typer's message (e.g. ``No such option: --bogus``).
    """
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name, cls=SectionedHelp)(command)
    click_command = typer.main.get_command(app)
    try:
        with click_command.make_context(name, list(args)) as ctx:
            return dict(ctx.params)
    except typer.Exit:  # --help printed the help
        raise ConfigError([f"the {name} options are listed above (--help is not one)"]) from None
    except Exception as err:  # Typer's (vendored) click UsageError family
        if not hasattr(err, "format_message"):
            raise
        raise ConfigError([err.format_message()]) from None
