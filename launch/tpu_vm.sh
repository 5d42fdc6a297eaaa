#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host) with the same command as on one machine.
#
#   launch/tpu_vm.sh create|setup|run|logs|delete [--dry-run]
#
# Settings come from the environment:
#   TPU_NAME (required), ZONE (required), ACCELERATOR (e.g. v5litepod-16), RUNTIME
#   (e.g. v2-alpha-tpuv5-lite), PROJECT (gcloud project, optional), QUEUED=1 to use queued
#   resources, CONFIG (default configs/speechssm.py), WORKDIR (a gs:// path shared by all
#   hosts, required for run), EXTRA (more flags for avjax.main).
#
# `run` copies this checkout to every worker, installs it with the tpu extra and starts
# `python -m avjax.main` on --worker=all; jax.distributed.initialize() in avjax.main joins the
# hosts. Re-running `run` after a preemption resumes from WORKDIR's newest checkpoint.
set -euo pipefail

DRY=0
ACTION=${1:-}
shift || true
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
CONFIG=${CONFIG:-configs/speechssm.py}
EXTRA=${EXTRA:-}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}

case "$ACTION" in
  create)
    if [ "${QUEUED:-0}" = 1 ]; then
      run gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" \
        --zone="$ZONE" $PROJECT_FLAG --accelerator-type="$ACCELERATOR" \
        --runtime-version="$RUNTIME"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    fi
    ;;
  setup)
    tarball=/tmp/avjax-src.tgz
    repo=$(cd "$(dirname "$0")/.." && pwd)
    run tar czf "$tarball" -C "$repo" --exclude=.venv --exclude=workdir --exclude=.git .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/avjax-src.tgz" --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/avjax && tar xzf ~/avjax-src.tgz -C ~/avjax && cd ~/avjax && \
python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    : "${WORKDIR:?set WORKDIR (a gs:// path shared by every host)}"
    ssh_all "cd ~/avjax && nohup .venv/bin/python -m avjax.main --config=$CONFIG \
--workdir=$WORKDIR $EXTRA > ~/avjax/train.log 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -f ~/avjax/train.log"
    ;;
  delete)
    if [ "${QUEUED:-0}" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" \
        $PROJECT_FLAG --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    fi
    ;;
  *)
    echo "usage: $0 create|setup|run|logs|delete [--dry-run]" >&2
    exit 2
    ;;
esac
