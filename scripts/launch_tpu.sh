#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: copy this checkout to every worker, install, and run
# the same `glocal train` command on all of them (JAX finds its peers through the TPU
# metadata, and the trainer calls jax.distributed.initialize() on multi-worker slices).
#
#   scripts/launch_tpu.sh TPU_NAME ZONE --config transformer_base --workdir gs://BUCKET/run1 \
#       dtype=bfloat16 batch_size=256 seq_len=2048 mesh.fsdp=-1 mesh.data=1
#
# The workdir must be visible to every worker (a gs:// bucket or a shared filesystem).
# Re-running the same command resumes from the newest checkpoint (e.g. after preemption).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE glocal-train-arguments..." >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project "$PROJECT")
fi

remote_dir=glocal
args=$(printf '%q ' "$@")
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all)

# 1. Ship the code (the same commit on every worker).
tar czf /tmp/glocal-src.tgz --exclude=.venv --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/glocal-src.tgz "$tpu:/tmp/" --zone "$zone" "${project_flag[@]}" --worker=all

# 2. Install (pinned versions + the TPU jaxlib) and 3. train, on all workers at once.
"${ssh[@]}" --command "set -e; mkdir -p $remote_dir && tar xzf /tmp/glocal-src.tgz -C $remote_dir && cd $remote_dir \
  && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]' \
  && .venv/bin/glocal train $args"
