#!/usr/bin/env bash
# Issue #16's data: >= 8,000 prompts in the default model's own words, then the
# model's greedy responses to them. Both steps append and resume: after an
# interruption run this script again (same code, same arguments) and it ends
# with the same files as an uninterrupted run. Measured rates: docs/data.md.
#
#   examples/make_distill_data.sh [OUT_DIR]      (default /work/data16)
set -euo pipefail
OUT=${1:-/work/data16}
SEED=0
NUM=8200          # >= 8,000 after empty responses are skipped
BATCH=32          # sequences decoded together (docs/data.md: responses/hour by batch size)
# One BLAS thread: on a shared CPU it gives more tokens per CPU-second than two
# spinning threads (docs/data.md), and a fixed count keeps resumed runs exact.
export OPENBLAS_NUM_THREADS=1
mkdir -p "$OUT"
nice -n 19 python -m mlx_mtp.training.prompt_writer --out "$OUT/prompts.jsonl" --num "$NUM" --seed "$SEED" \
    --chunk 128 --batch-size "$BATCH"
python -m mlx_mtp.training.prompt_writer --report "$OUT/prompts.jsonl" > "$OUT/prompts_report.json"
nice -n 19 python -m mlx_mtp.distill --prompts "$OUT/prompts.jsonl" --out "$OUT/distilled" \
    --max-tokens 256 --batch-size "$BATCH" --chunk $((4 * BATCH)) --valid-fraction 0.05 --no-progress
