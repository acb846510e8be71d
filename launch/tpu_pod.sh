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

# Ship the committed tree (not .venv, runs or caches) to a fresh directory on every host, install
# it there with the TPU build of jax, and train.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$(git rev-parse --show-toplevel)" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$archive" "$tpu:~/diffujax.tar.gz"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; rm -rf ~/$repo.new && mkdir ~/$repo.new && tar -xzf ~/diffujax.tar.gz -C ~/$repo.new
  if [ -d ~/$repo/.venv ]; then mv ~/$repo/.venv ~/$repo.new/; fi
  rm -rf ~/$repo && mv ~/$repo.new ~/$repo && cd ~/$repo
  test -x .venv/bin/python || python3 -m venv .venv
  .venv/bin/pip install --quiet -e '.[tpu]'
  .venv/bin/diffujax train --config $config mesh.distributed=true$overrides
"
