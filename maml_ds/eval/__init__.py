"""Evaluation with the MetaICL protocol, very few-shot adaptation, and their results.

scoring (option losses, KV-cached) -> cache (per-(task, seed) files) -> run (the loop) ->
results (files read back); adapt wraps run; metrics is the arithmetic. docs/evaluation.md.
"""

from maml_ds.eval.adapt import AdaptOptions, run_adaptation
from maml_ds.eval.metrics import win_rate
from maml_ds.eval.results import default_label, iter_result_files, paper_order, read_result
from maml_ds.eval.run import EvalOptions, evaluate
from maml_ds.eval.scoring import ScoringStats, argmin_first, score_examples

__all__ = [
    "AdaptOptions",
    "EvalOptions",
    "ScoringStats",
    "argmin_first",
    "default_label",
    "evaluate",
    "iter_result_files",
    "paper_order",
    "read_result",
    "run_adaptation",
    "score_examples",
    "win_rate",
]
