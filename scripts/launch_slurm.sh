#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, all of a node's GPUs per task.
# Submit with sbatch (adjust nodes/GPUs/partition to your cluster):
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/launch_slurm.sh \
#       --config transformer_base --workdir /shared/runs/base dtype=bfloat16 batch_size=256
#
# SLURM's variables make the trainer call jax.distributed.initialize(), which reads the
# coordinator address and process ids from them. The workdir must be on a shared
# filesystem. A requeued job (--requeue; SIGTERM before preemption) resumes from the
# newest checkpoint because the command is the same: the tasks agree to stop after one step.
# If a task dies the others exit (status 3) with one line; GLOCAL_HEARTBEAT_TIMEOUT (seconds,
# default 30) bounds how long a silent task is waited for. To rehearse on one machine:
#   glocal launch --processes 2 --devices-per-process 4 -- train ...
#SBATCH --job-name=glocal
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -x .venv/bin/glocal ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e '.[cuda]'
fi
export GLOCAL_DISTRIBUTED=1
srun --kill-on-bad-exit=1 .venv/bin/glocal train "$@"
