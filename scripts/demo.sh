#!/usr/bin/env bash
# The CPU demo (`make demo`): write the synthetic suite, meta-train a tiny GPT-2 with MetaICL
# on 2 CPU ranks under DeepSpeed, then evaluate it with the MetaICL protocol.
# Override with env vars: DATA, RUN, STEPS, METHOD (e.g. METHOD=maml-2-1).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${DATA:-data/synthetic}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-300}
METHOD=${METHOD:-metaicl}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

if [ ! -f "$DATA/config/synthetic.json" ]; then
  "$BIN/maml-ds" data synth --out "$DATA"
fi
"$BIN/deepspeed" --num_gpus 2 "$BIN/maml-ds" train \
  --method "$METHOD" --data "$DATA" --setting synthetic --model tiny --out "$RUN" \
  --max-steps "$STEPS" --micro-batch-size 4 --k 16 --lr 1e-3 --inner-lr 1e-3
"$BIN/maml-ds" eval --model "$RUN" --data "$DATA" --setting synthetic --variant direct
"$BIN/maml-ds" eval --model "$RUN" --data "$DATA" --setting synthetic --variant direct \
  --baseline no-icl
echo "run folder: $RUN"
