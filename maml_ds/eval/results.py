"""Result files read back: summaries for `maml-ds compare`, the paper's row labels and order.

Reads the JSON that `EvalResult.save` writes (`RESULT_FORMAT`), nothing else: no model, no
data. The tables and the win rule: docs/evaluation.md ("maml-ds compare").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from maml_ds.config import ConfigError, parse_method
from maml_ds.data.tasks import DataError

__all__ = [
    "RESULT_FORMAT",
    "ResultSummary",
    "default_label",
    "iter_result_files",
    "paper_order",
    "read_result",
    "safe_name",
]

RESULT_FORMAT = "maml-ds-eval"
"""The `format` field of every result file."""


def safe_name(text: str) -> str:
    """`text` (a task, setting or model id) as one file-name component: each run of characters
    other than letters, digits, '.', '_' and '-' becomes '_'; never empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "_"


@dataclass(frozen=True)
class ResultSummary:
    """What `maml-ds compare` needs from a result file."""

    path: Path
    label: str
    column: str
    average: float
    worst: float
    seed_independent: bool
    """One seed, or no demonstrations: the tables print one number, not "avg/worst"."""


def read_result(path: Path | str) -> ResultSummary:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read a result file ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != RESULT_FORMAT:
        raise DataError(
            f"{path}: not a maml-ds result file (written by `maml-ds eval` or `maml-ds adapt`)"
        )
    try:
        return ResultSummary(
            path,
            str(raw["label"]),
            str(raw["column"]),
            float(raw["average"]),
            float(raw["worst"]),
            len(raw["seeds"]) == 1 or not raw["options"]["use_demonstrations"],
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: incomplete result file (missing {err})") from None


def _method_label(train_method: str | None) -> str | None:
    """MetaICL, MAML-2-4, FOMAML-2-4 for a run's training method; None without a valid one."""
    if not train_method:
        return None
    try:
        spec = parse_method(train_method)
    except ConfigError:
        return None
    return {"metaicl": "MetaICL", "copy": "Copy pre-trained"}.get(spec.kind, spec.name.upper())


def default_label(
    *, baseline: str, variant: str, train_method: str | None, model_name: str, kind: str = "eval"
) -> str:
    """The paper's row names: No ICL, Raw LM, MetaICL, MAML-2-4 (FOMAML-2-4), with a
    "Channel " prefix for channel scoring and " +adapt" for adapted models."""
    if baseline == "no-icl":
        base = "No ICL"
    elif baseline == "raw-lm":
        base = "Raw LM"
    else:
        base = _method_label(train_method) or Path(model_name.rstrip("/")).name or model_name
    label = f"Channel {base}" if variant == "channel" else base
    return f"{label} +adapt" if kind == "adapt" else label


def paper_order(label: str) -> tuple[int, int, int, str]:
    """Sort key of a row: standard before channel, then No ICL, Raw LM, MetaICL, MAML-*,
    FOMAML-*, anything else; adapted after unadapted (the paper's tables)."""
    base = label.removeprefix("Channel ").removesuffix(" +adapt")
    rank = {"No ICL": 0, "Raw LM": 1, "MetaICL": 2}.get(base)
    if rank is None:
        rank = 3 if base.startswith("MAML-") else 4 if base.startswith("FOMAML-") else 5
    return (int(label.startswith("Channel ")), int(label.endswith(" +adapt")), rank, base)


def iter_result_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given; a folder contributes its `*.json` result files (not its cache)."""
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.glob("*.json") if q.is_file())
        else:
            yield p
