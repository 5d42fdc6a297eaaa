#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host) with the same command as on one machine.
#
#   launch/tpu_vm.sh create|setup|run|logs|delete [--dry-run] [AVJAX_FLAG ...]
#
# Settings come from the environment:
#   TPU_NAME (required), ZONE (required), ACCELERATOR (e.g. v5litepod-16), RUNTIME
#   (e.g. v2-alpha-tpuv5-lite), PROJECT (gcloud project, optional), QUEUED=1 to use queued
#   resources, CONFIG (default configs/speechssm.py), WORKDIR (a gs:// path shared by all
#   hosts, required for run), EXTRA (more flags for avjax.main, split on whitespace only: no
#   quotes, no globbing). Arguments after the action other than --dry-run go to avjax.main
#   (`run` only), each as one argument, spaces, quotes and `$` included.
#
# `run` copies this checkout to every worker, installs it with the tpu extra and starts
# `python -m avjax.main` on --worker=all; jax.distributed.initialize() in avjax.main joins the
# hosts. Re-running `run` after a preemption resumes from WORKDIR's newest checkpoint.
set -euo pipefail

DRY=0
ACTION=${1:-}
shift || true
args=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY=1; else args+=("$a"); fi
done
if [ "${#args[@]}" -gt 0 ] && [ "$ACTION" != run ]; then
  echo "$ACTION: unexpected arguments (only run passes arguments on to avjax.main)" >&2
  exit 2
fi

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
CONFIG=${CONFIG:-configs/speechssm.py}
EXTRA=${EXTRA:-}
project=()
if [ -n "${PROJECT:-}" ]; then project=("--project=$PROJECT"); fi
extra=()
if [ -n "$EXTRA" ]; then read -r -d '' -a extra <<<"$EXTRA" || true; fi

run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all \
    --command="$1"
}

case "$ACTION" in
  create)
    if [ "${QUEUED:-0}" = 1 ]; then
      run gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" \
        --zone="$ZONE" "${project[@]}" --accelerator-type="$ACCELERATOR" \
        --runtime-version="$RUNTIME"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${project[@]}" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    fi
    ;;
  setup)
    tarball=/tmp/avjax-src.tgz
    repo=$(cd "$(dirname "$0")/.." && pwd)
    run tar czf "$tarball" -C "$repo" --exclude=.venv --exclude=workdir --exclude=.git .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/avjax-src.tgz" --zone="$ZONE" \
      "${project[@]}" --worker=all
    ssh_all "mkdir -p ~/avjax && tar xzf ~/avjax-src.tgz -C ~/avjax && cd ~/avjax && \
python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    : "${WORKDIR:?set WORKDIR (a gs:// path shared by every host)}"
    # The remote shell reads this string: every argument is quoted for it (printf %q).
    cmd=(.venv/bin/python -m avjax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${extra[@]}"
      "${args[@]}")
    ssh_all "cd ~/avjax && nohup $(printf '%q ' "${cmd[@]}")> ~/avjax/train.log 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=0 \
      --command="tail -f ~/avjax/train.log"
    ;;
  delete)
    if [ "${QUEUED:-0}" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" \
        "${project[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project[@]}" --quiet
    fi
    ;;
  *)
    echo "usage: $0 create|setup|run|logs|delete [--dry-run]" >&2
    exit 2
    ;;
esac
