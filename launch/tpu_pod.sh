#!/usr/bin/env bash
# Run launch/train.py on a Cloud TPU VM slice: one process per worker, all started together with
# --distributed (JAX reads the process count and ids from the TPU runtime).
#
# usage: TPU_NAME=NAME TPU_ZONE=ZONE TPU_TYPE=TYPE WORKDIR=gs://BUCKET/PATH \
#          bash launch/tpu_pod.sh STEP... [-- train.py flags]
#   STEP: create  make the slice (gcloud compute tpus tpu-vm create)
#         push    copy this checkout (tracked and untracked, not ignored files) to every worker
#         setup   install Python 3.11, spp_jax with the `tpu` extra and its assets (setup.sh), gcsfuse
#         run     mount WORKDIR's bucket on every worker and run launch/train.py --distributed there
#         delete  delete the slice
#         all     create push setup run
# e.g.   TPU_NAME=spp TPU_ZONE=us-central2-b TPU_TYPE=v4-16 WORKDIR=gs://my-bucket/vit_fmnist \
#          bash launch/tpu_pod.sh all -- --config.search.batch_size=256
#
# Environment: TPU_NAME, TPU_ZONE, TPU_TYPE (accelerator type, e.g. v4-16, v5litepod-16), WORKDIR (a gs://
# path: every worker mounts the bucket with gcsfuse, so all processes share one workdir) are required;
# TPU_VERSION (runtime: default tpu-ubuntu2204-base for v4/v5p; v2-alpha-tpuv5-lite for v5e), CONFIG (default configs/vit.py), PROJECT (default:
# gcloud's), REMOTE_DIR (checkout on the workers, default spp_jax), SETUP_CMD (assets, default
# `bash setup.sh`) are optional. A rerun of `run` resumes the run in WORKDIR (a preempted slice included).
# A bucket with hierarchical namespace renames directories atomically (orbax commits a step by a rename);
# on a flat bucket gcsfuse copies them.
set -euo pipefail

usage() {
  sed -n '/^# usage:/,/^#$/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
steps=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do steps+=("$1"); shift; done
[ ${#steps[@]} -gt 0 ] || usage
[ $# -gt 0 ] && shift  # the "--"
train_flags=""
[ $# -eq 0 ] || train_flags=$(printf ' %q' "$@")
: "${TPU_NAME:?set TPU_NAME (the slice name); see the usage line at the top of $0}"
: "${TPU_ZONE:?set TPU_ZONE (e.g. us-central2-b)}"
: "${TPU_TYPE:?set TPU_TYPE (accelerator type, e.g. v4-16)}"
: "${WORKDIR:?set WORKDIR to a gs://bucket/path every worker can write}"
case "$WORKDIR" in gs://?*) ;; *) echo "error: WORKDIR=$WORKDIR is not gs://bucket/path; give a GCS path" >&2; exit 2 ;; esac
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/vit.py}
REMOTE_DIR=${REMOTE_DIR:-spp_jax}
SETUP_CMD=${SETUP_CMD:-bash setup.sh}
BUCKET_PATH=${WORKDIR#gs://}
BUCKET=${BUCKET_PATH%%/*}
SUBDIR=${BUCKET_PATH#"$BUCKET"}
MOUNT='$HOME/spp_gcs'  # expanded on the workers
VENV='$HOME/spp_venv'

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$TPU_ZONE" ${PROJECT:+--project="$PROJECT"})
on_all() { "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

create() {
  "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$TPU_TYPE" --version="$TPU_VERSION"
}

push() {
  local root tgz
  root=$(cd "$(dirname "$0")/.." && pwd)
  tgz=$(mktemp -d)/spp_jax.tgz
  (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar czf "$tgz" --null -T -)
  "${gc[@]}" scp "$tgz" "$TPU_NAME":spp_jax.tgz "${where[@]}" --worker=all
  on_all "mkdir -p $REMOTE_DIR && tar xzf spp_jax.tgz -C $REMOTE_DIR && rm spp_jax.tgz"
}

setup() {
  on_all "set -e
    sudo apt-get update -qq
    sudo apt-get install -y -qq python3.11 python3.11-venv curl lsb-release
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    python3.11 -m venv $VENV
    cd $REMOTE_DIR
    PYTHON=$VENV/bin/python $SETUP_CMD
    $VENV/bin/python -m pip install -q -e '.[tpu]'"
}

run() {
  on_all "set -e
    mkdir -p $MOUNT
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 $BUCKET $MOUNT
    cd $REMOTE_DIR
    $VENV/bin/python launch/train.py --distributed --config $(printf %q "$CONFIG") --workdir $MOUNT$SUBDIR$train_flags"
}

delete() { "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet; }

for step in "${steps[@]}"; do
  case "$step" in
    create | push | setup | run | delete) "$step" ;;
    all) create && push && setup && run ;;
    *) echo "error: unknown step $step; use create, push, setup, run, delete or all" >&2; exit 2 ;;
  esac
done
