#!/usr/bin/env bash
# Losses of a short MetaICL and a maml-2-2 (ZeRO-2) run, one process each: a refactor that keeps
# the math prints the same lines (docs/architecture.md). Usage: scripts/golden_losses.sh OUT_DIR
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${1:?out dir}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
rm -rf "$OUT"; mkdir -p "$OUT"
"$BIN/maml-ds" data synth --out "$OUT/data" --seed 0 >/dev/null
"$BIN/maml-ds" train --method metaicl --data "$OUT/data" --setting synthetic --model tiny \
  --out "$OUT/metaicl" --max-steps 6 --micro-batch-size 2 --k 4 --lr 1e-3 >/dev/null 2>&1
"$BIN/maml-ds" train --method maml-2-2 --data "$OUT/data" --setting synthetic --model tiny \
  --out "$OUT/maml" --max-steps 3 --micro-batch-size 2 --k 4 --lr 1e-3 --inner-lr 1e-3 --zero 2 >/dev/null 2>&1
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for run in ("metaicl", "maml"):
    for line in open(f"{out}/{run}/history.jsonl"):
        r = json.loads(line)
        print(run, r["step"], repr(r["loss"]), repr(r.get("support_loss")), repr(r.get("query_loss")))
PY
