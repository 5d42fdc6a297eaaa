#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, same command everywhere.
#
#   NODES=2 GPUS_PER_NODE=8 WORKDIR=/shared/runs/speechssm launch/slurm_gpu.sh [--dry-run]
#
# Submits an sbatch job whose srun starts `python -m avjax.main` once per GPU. avjax.main
# calls jax.distributed.initialize(), which reads the SLURM environment (coordinator, process
# id and count). WORKDIR must be on storage every node sees; re-submitting resumes.
# Settings: NODES, GPUS_PER_NODE, PARTITION, TIME (default 24:00:00), CONFIG, EXTRA, VENV
# (a virtualenv with `pip install -e '.[gpu]'`, default ./.venv).
set -euo pipefail
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
: "${WORKDIR:?set WORKDIR (shared by all nodes)}"
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TIME=${TIME:-24:00:00}
CONFIG=${CONFIG:-configs/speechssm.py}
EXTRA=${EXTRA:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
PARTITION_LINE=${PARTITION:+#SBATCH --partition=$PARTITION}

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=avjax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.log
$PARTITION_LINE
cd $REPO
srun --kill-on-bad-exit=1 $VENV/bin/python -m avjax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA
SBATCH
)

if [ "$DRY" = 1 ]; then
  echo "# would submit with sbatch:"
  echo "$script"
else
  mkdir -p "$WORKDIR"
  echo "$script" | sbatch
fi
