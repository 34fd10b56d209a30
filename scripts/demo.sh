#!/usr/bin/env bash
# The CPU demo (`make demo`): `maml-ds study` with its built-in defaults: the synthetic suite, the
# shipped starting model, then No ICL, Raw LM, MetaICL, MAML-2-1 and MAML-2-4 on 2 CPU ranks, 5 seeds,
# the paper's tables (docs/study.md). A rerun continues where a killed one stopped.
# Override: OUT (study folder), extra flags after the script (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
OUT=${OUT:-studies/cpu}
.venv/bin/maml-ds study --out "$OUT" "$@"
