#!/usr/bin/env bash
# Run `diffujax train` on every host of a Cloud TPU VM or multi-host TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#
# Each host runs one process with the same config; diffujax calls jax.distributed.initialize()
# itself on TPU (the TPU runtime supplies coordinator, process count and index), loads only its
# share of the data, and process 0 writes logs. output_dir should be a bucket path (gs://...) or
# a shared filesystem so every host sees the same checkpoints; resume is automatic.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
overrides=$(printf ' %q' "$@")
repo=${DIFFUJAX_REPO_DIR:-diffujax}

# Copy the working tree to every host, install (with the TPU build of jax) and train.
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  "$(git rev-parse --show-toplevel)" "$tpu:~/$repo"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; cd ~/$repo
  test -d .venv || python3 -m venv .venv
  .venv/bin/pip install --quiet -e '.[tpu]'
  .venv/bin/diffujax train --config $config mesh.distributed=true$overrides
"
