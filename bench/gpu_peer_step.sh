#!/usr/bin/env bash
# spp_jax's search step against the PyTorch restatement of the reference step on one GPU (issue: ViT-B/16 at
# batch 256, 224 px; the SmolLM2 shape at sequence 2048), both sides on the GPU, bfloat16 first (torch under
# autocast, spp_jax's bfloat16 compute dtype, each attention core), then float32 (TF32 matmuls on both).
#   OUT=results_dir bash bench/gpu_peer_step.sh
# Needs jax (CUDA), flax, optax, torch (CUDA) and numpy. Results: $OUT/peer_step_{bf16,f32}.json, each
# rewritten after every row, so a run cut short keeps the rows it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
# JAX takes 45% of the GPU's memory, the torch child process allocates from the rest
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu_peer.txt"
python3 -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)" | tee -a "$OUT/gpu_peer.txt"
common=(--device cuda --variant B/16 --tokens 197 --batch 256 --llm_seq 2048 --llm_batch 4 --steps 5
        --torch_attention sdpa)
python3 bench/peer_step.py "${common[@]}" --dtype bfloat16 --jax_attention cudnn,xla --out "$OUT/peer_step_bf16.json"
python3 bench/peer_step.py "${common[@]}" --dtype float32 --out "$OUT/peer_step_f32.json"
