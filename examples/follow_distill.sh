#!/usr/bin/env bash
# Distils the prompts of make_distill_data.sh while its prompt writer is still
# writing them, on a core the writer leaves idle: every few minutes the whole
# chunks of 128 prompts written so far (--max-prompts, a multiple of --chunk,
# so that chunks fall where one run over the full file puts them), then, once
# the writer's state file says all prompts are there, the rest. The settings
# are make_distill_data.sh's, so either script resumes the other's output.
#
#   examples/follow_distill.sh [OUT_DIR]      (default /work/data16)
set -uo pipefail
OUT=${1:-/work/data16}
CHUNK=128
export OPENBLAS_NUM_THREADS=1
ARGS=(--prompts "$OUT/prompts.jsonl" --out "$OUT/distilled" --max-tokens 256 --batch-size 32
      --chunk "$CHUNK" --valid-fraction 0.05 --no-progress)
field() {  # field FILE EXPR: a value from a JSON state file (empty if unreadable)
    python -c "import json,sys; s=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null
}
while true; do
    if [ "$(field "$OUT/prompts.jsonl.state.json" "int(s['rows'] >= s['settings']['num'])")" = 1 ]; then
        echo "$(date -u +%H:%M) all prompts written: distilling the rest"
        nice -n 19 python -m mlx_mtp.distill "${ARGS[@]}" && exit 0
        sleep 60
        continue
    fi
    written=$(( $(wc -l < "$OUT/prompts.jsonl" 2>/dev/null || echo 0) / CHUNK * CHUNK ))
    done_=$(field "$OUT/distilled/.distill_state.json" "s['done']")
    if [ "$written" -gt "${done_:-0}" ]; then
        echo "$(date -u +%H:%M) distilling the first $written prompts"
        nice -n 19 python -m mlx_mtp.distill "${ARGS[@]}" --max-prompts "$written" || sleep 60
    else
        sleep 300
    fi
done
