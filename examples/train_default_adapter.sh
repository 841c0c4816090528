#!/usr/bin/env bash
# Reproduce the adapter shipped for the default model (SmolLM2-135M-Instruct):
# prompts -> self-distilled responses -> training -> draft vocabulary -> package -> benchmark.
# Every step resumes where it stopped when run again (distill and training keep
# their progress in runs/). Set ITERS/NUM_PROMPTS to change the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
[ -e "$OPENBLAS" ] && export LD_PRELOAD="$OPENBLAS"
NUM_PROMPTS=${NUM_PROMPTS:-3000}
ITERS=${ITERS:-3000}
K=${K:-4}
MODEL=$(python -c "from convert.gguf import ensure_default_model; print(ensure_default_model('float32'))")
OUT=mlx_mtp/adapters/smollm2-135m-instruct

# 1. training prompts, disjoint from any benchmark (templated tasks, stdlib docstrings)
[ -e runs/prompts.jsonl ] || python examples/make_prompts.py --out runs/prompts.jsonl --num "$NUM_PROMPTS"
# 2. the base model's own greedy responses (resumes)
python -m mlx_mtp.distill --model "$MODEL" --prompts runs/prompts.jsonl --out runs/distill \
    --max-tokens 256 --batch-size 16 --valid-fraction 0.05
# 3. masks, gated LoRA and sampler head (resumes from the last checkpoint)
RESUME=()
[ -e runs/adapter_k$K/training_state.safetensors ] && RESUME=(--resume-adapter-file runs/adapter_k$K)
python -m mlx_mtp.lora --model "$MODEL" --train --data runs/distill --adapter-path runs/adapter_k$K \
    --num-masks "$K" --rank 16 --alpha 32 --iters "$ITERS" --batch-size 2 --learning-rate 5e-4 --warmup 20 \
    --max-seq-length 1024 --mask-chunk 256 --save-every 20 --steps-per-report 5 --steps-per-eval 60 \
    --val-batches 4 "${RESUME[@]}"
# 4. into the package, fp16, with a frequency-ranked draft vocabulary
python examples/ship_adapter.py --model "$MODEL" --adapter-path runs/adapter_k$K --out "$OUT" \
    --recipe '{"script": "examples/train_default_adapter.sh", "data": "self-distilled, examples/make_prompts.py"}'
python -m mlx_mtp.draft_vocab --model "$MODEL" --adapter-path "$OUT" --data runs/distill --size 8192
# 5. measure
python -m mlx_mtp.benchmark --model "$MODEL" --adapter-path "$OUT" --num-prompts 3 --max-tokens 128 \
    --json runs/benchmark.json
