#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, same command everywhere.
#
#   NODES=2 GPUS_PER_NODE=8 WORKDIR=/shared/runs/speechssm launch/slurm_gpu.sh [--dry-run] \
#       [AVJAX_FLAG ...]
#
# Submits an sbatch job whose srun starts `python -m avjax.main` once per GPU. avjax.main
# calls jax.distributed.initialize(), which reads the SLURM environment (coordinator, process
# id and count). WORKDIR must be on storage every node sees; re-submitting resumes.
# Settings: NODES, GPUS_PER_NODE, PARTITION, TIME (default 24:00:00), CONFIG, EXTRA, VENV
# (a virtualenv with `pip install -e '.[gpu]'`, default ./.venv).
# Every argument other than --dry-run goes to avjax.main as one argument, spaces, quotes and
# `$` included (e.g. '--config.data.manual_dir=/data/my corpus'). EXTRA is split on
# whitespace only (no quotes, no globbing): use arguments for values with spaces.
# --dry-run prints the sbatch command (as a comment) and the job script, creating nothing.
set -euo pipefail
DRY=0
args=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY=1; else args+=("$a"); fi
done
: "${WORKDIR:?set WORKDIR (shared by all nodes)}"
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TIME=${TIME:-24:00:00}
CONFIG=${CONFIG:-configs/speechssm.py}
EXTRA=${EXTRA:-}
PARTITION=${PARTITION:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}

# #SBATCH lines are read by sbatch, not bash: only plain values go there.
for v in NODES GPUS_PER_NODE; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v=${!v}: expected a number" >&2; exit 2; }
done
for v in TIME PARTITION; do
  [[ ${!v} =~ ^[A-Za-z0-9:,._-]*$ ]] || { echo "$v=${!v}: unexpected characters" >&2; exit 2; }
done

extra=()
if [ -n "$EXTRA" ]; then read -r -d '' -a extra <<<"$EXTRA" || true; fi
cmd=("$VENV/bin/python" -m avjax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${extra[@]}"
  "${args[@]}")
# The log path goes on sbatch's command line (an argument, so any WORKDIR works).
submit=(sbatch "--output=$WORKDIR/slurm-%j.log")

script="#!/usr/bin/env bash
#SBATCH --job-name=avjax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --time=$TIME
${PARTITION:+#SBATCH --partition=$PARTITION
}set -euo pipefail
cd $(printf '%q' "$REPO")
srun --kill-on-bad-exit=1 $(printf '%q ' "${cmd[@]}")"

if [ "$DRY" = 1 ]; then
  echo "# would run: $(printf '%q ' "${submit[@]}")< (this job script)"
  printf '%s\n' "$script"
else
  mkdir -p -- "$WORKDIR"
  printf '%s\n' "$script" | "${submit[@]}"
fi
