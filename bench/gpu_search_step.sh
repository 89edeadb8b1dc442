#!/usr/bin/env bash
# Search-step speed and MFU on one accelerator (issue: ViT-B/16 at batch 256, 224 px; the SmolLM2 shape at
# sequence 2048), official and curvature forms, each against a full fine-tuning step of the same batch.
#   OUT=results_dir bash bench/gpu_search_step.sh
# Needs only jax, flax, optax and numpy. Results: $OUT/*.json (bench/search_step.py's fields).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
for mode in official curvature; do
  python3 bench/search_step.py --variant B/16 --batch 256 --image_size 224 --steps 5 --mode $mode \
    --out "$OUT/vit_b16_b256_$mode.json"
  python3 bench/search_step.py --arch llama --variant smollm2-135m --batch 8 --seq 2048 --steps 5 \
    --mode $mode --out "$OUT/smollm2_b8_s2048_$mode.json"
done
