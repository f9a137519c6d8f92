#!/usr/bin/env bash
# Render and apply a Kubernetes (GKE) Job that runs `python -m jaxlm.main` on every host of a TPU
# slice or every GPU node: an Indexed Job (one pod per host) plus a headless Service for DNS.
#
#   launch/gke.sh [--dry-run] --image IMAGE [--accelerator tpu|gpu] [--hosts N] [--name NAME] \
#       [--tpu-type tpu-v5-lite-podslice --tpu-topology 4x4 --chips-per-host 4] [--gpus-per-host 8] \
#       [--pvc CLAIM] -- --config=configs/gpt2_small.py --workdir=/runs/small
#
# The workdir must be on the mounted volume (--pvc, mounted at /runs) so checkpoints outlive pods;
# the Job's backoffLimit restarts failed pods, which resume from the last checkpoint.
# TPU: jax.distributed.initialize() configures itself from GKE's TPU environment. GPU: process 0's
# pod is the coordinator (JAXLM_COORDINATOR_ADDRESS), each pod's index its process id.
# --dry-run prints the manifest and the kubectl command instead of applying.
set -euo pipefail
dry=0; image=""; accel=tpu; hosts=4; name=jaxlm; tpu_type=tpu-v5-lite-podslice; topology=4x4
chips=4; gpus=8; pvc=jaxlm-runs; retries=20
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --image) image="$2"; shift 2 ;;
    --accelerator) accel="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --tpu-type) tpu_type="$2"; shift 2 ;;
    --tpu-topology) topology="$2"; shift 2 ;;
    --chips-per-host) chips="$2"; shift 2 ;;
    --gpus-per-host) gpus="$2"; shift 2 ;;
    --pvc) pvc="$2"; shift 2 ;;
    --retries) retries="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -n "$image" ] || { echo "--image is required (a container with this repo and its requirements)" >&2; exit 2; }
printf '%s\n' "$@" | grep -q -- '^--workdir=' || { echo "give --config=... and --workdir=... after --" >&2; exit 2; }
args=""; for a in "python" "-m" "jaxlm.main" "$@"; do args+="$(printf '\n        - "%s"' "${a//\"/\\\"}")"; done

if [ "$accel" = tpu ]; then
  selector=$(printf '        cloud.google.com/gke-tpu-accelerator: %s\n        cloud.google.com/gke-tpu-topology: %s' "$tpu_type" "$topology")
  resources="google.com/tpu: \"$chips\""
  env=""
elif [ "$accel" = gpu ]; then
  selector='        cloud.google.com/gke-accelerator: nvidia-h100-80gb'
  resources="nvidia.com/gpu: \"$gpus\""
  env=$(cat <<ENV
        env:
        - name: JAXLM_COORDINATOR_ADDRESS
          value: "$name-0.$name:1234"
        - name: JAXLM_NUM_PROCESSES
          value: "$hosts"
        - name: JAXLM_PROCESS_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
ENV
)
else
  echo "--accelerator must be tpu or gpu" >&2; exit 2
fi

manifest=$(cat <<YAML
apiVersion: v1
kind: Service
metadata:
  name: $name
spec:
  clusterIP: None
  selector:
    job-name: $name
---
apiVersion: batch/v1
kind: Job
metadata:
  name: $name
spec:
  completionMode: Indexed
  completions: $hosts
  parallelism: $hosts
  backoffLimit: $retries
  template:
    metadata:
      labels:
        job-name: $name
    spec:
      subdomain: $name
      restartPolicy: Never
      nodeSelector:
$selector
      containers:
      - name: jaxlm
        image: $image
        workingDir: /jaxlm
        command:$args
$env
        resources:
          limits:
            $resources
        volumeMounts:
        - name: runs
          mountPath: /runs
      volumes:
      - name: runs
        persistentVolumeClaim:
          claimName: $pvc
YAML
)
manifest=$(printf '%s\n' "$manifest" | sed '/^$/d')
if [ "$dry" = 1 ]; then
  printf '%s\n' "$manifest"
  echo "+ kubectl apply -f -"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
