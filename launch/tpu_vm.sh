#!/usr/bin/env bash
# Train on a TPU VM pod slice: create it, install jaxlm on every worker, run the same
# `python -m jaxlm.main` on all workers, stream their output, and after a preemption recreate the
# slice and run again (the run resumes from its last checkpoint), then delete it.
#
#   launch/tpu_vm.sh [--dry-run] [--env FILE] [STEP] -- --config=configs/gpt2_small.py --workdir=gs://BUCKET/runs/small
#
# The workdir is a bucket (checkpoints via Orbax, metrics, token cache; no mount needed) or a
# directory every worker shares (a Filestore or gcsfuse mount). Per-process logs stay on each worker.
# STEP: all (default: create, setup, train with retries, delete) | create | setup | train | logs | delete
# --dry-run prints every command instead of running it. Settings: launch/tpu.env.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dry=0; env_file="$here/tpu.env"; step=all
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --env) env_file="$2"; shift 2 ;;
    --) shift; break ;;
    all|create|setup|train|logs|delete) step="$1"; shift ;;
    -h|--help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
# shellcheck source=/dev/null
source "$env_file"
jaxlm_args=("$@")
if [[ "$step" =~ ^(all|train)$ ]] && ! printf '%s\n' "${jaxlm_args[@]}" | grep -q -- '^--workdir='; then
  echo "give the jaxlm arguments after --, including --config=... and --workdir=... (gs://BUCKET/DIR or shared storage)" >&2; exit 2
fi

run() {  # run a command, or print it (shell-quoted) with --dry-run
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")

create() {
  local spot=(); [ "$SPOT" = true ] && spot=(--spot)
  run "${tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot[@]}"
}
setup() {
  run "${tpu[@]}" scp --recurse --worker=all "${where[@]}" "$here/.." "$TPU_NAME:~/$REMOTE_DIR"
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all \
    --command="cd ~/$REMOTE_DIR && python3 -m pip install -q 'jax[tpu]' -r requirements.txt -e '.[gcs]'"
}
train_once() {
  local cmd; cmd="cd ~/$REMOTE_DIR && python3 -m jaxlm.main$(printf ' %q' "${jaxlm_args[@]}")"
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$cmd"
}
state() {
  if [ "$dry" = 1 ]; then run "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)'; echo READY; return; fi
  "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || echo GONE
}
logs() {
  local workdir dir; workdir=$(printf '%s\n' "${jaxlm_args[@]}" | sed -n 's/^--workdir=//p')
  dir="${workdir:-.}"
  if [[ "$workdir" == *://* ]]; then  # logs of a bucket workdir are local to each worker (jaxlm.paths.mirror)
    dir="\$(cd ~/$REMOTE_DIR && python3 -c 'import sys; from jaxlm import paths; print(paths.mirror(sys.argv[1]))' $(printf '%q' "$workdir"))"
  fi
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="tail -n 50 -F $dir/logs/process-*.log"
}
delete() { run "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet; }

train_with_retries() {
  local attempt=0
  until train_once; do
    attempt=$((attempt + 1))
    s=$(state)
    if [ "$attempt" -gt "$MAX_RETRIES" ] || [[ ! "$s" =~ ^(PREEMPTED|TERMINATED|GONE)$ ]]; then
      echo "training failed (TPU state $s, attempt $attempt); not retrying" >&2; return 1
    fi
    echo "TPU $TPU_NAME is $s: recreating it and resuming (attempt $attempt of $MAX_RETRIES)" >&2
    delete || true; create; setup
  done
}

case "$step" in
  create) create ;;
  setup) setup ;;
  train) train_with_retries ;;
  logs) logs ;;
  delete) delete ;;
  all) create; setup; status=0; train_with_retries || status=$?; delete; exit "$status" ;;
esac
