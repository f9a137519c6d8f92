#!/usr/bin/env bash
# Submit launch/slurm.sbatch.
#   launch/slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--per gpu|node] [--time HH:MM:SS] \
#       [--partition P] -- --config=configs/gpt2_small.py --workdir=/shared/runs/small
# --per gpu: one process per GPU (ntasks-per-node = G); --per node: one process owning all G GPUs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dry=0; nodes=1; gpus=8; per=gpu; time_limit=""; partition=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per) per="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$per" in gpu) tasks="$gpus" ;; node) tasks=1 ;; *) echo "--per must be gpu or node" >&2; exit 2 ;; esac
if ! printf '%s\n' "$@" | grep -q -- '^--workdir='; then
  echo "give the jaxlm arguments after --, including --config=... and --workdir=... (shared filesystem)" >&2; exit 2
fi
cmd=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks" --gpus-per-node="$gpus")
[ -n "$time_limit" ] && cmd+=(--time="$time_limit")
[ -n "$partition" ] && cmd+=(--partition="$partition")
cmd+=("$here/slurm.sbatch" "$@")
if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'; else "${cmd[@]}"; fi
