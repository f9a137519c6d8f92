#!/usr/bin/env bash
# The GPU throughput suite behind PERFORMANCE.md, on this machine's GPU(s).
#   launch/bench_gpu.sh [--dry-run] [--sizes "small medium"] [--batch B] [--python PY] OUTDIR [-- extra jaxlm.bench flags]
# For each size (configs/gpt2_<size>.py, or a config file's path), four runs of python -m jaxlm.bench:
#   fast     every regime; attention dropout 0 (so cuDNN attention where it is exact), deterministic
#            ops off, the PyTorch/HF baseline;
#   mistral  the upcast regimes as Mistral trains (dropout 0.1, so the flash kernel on one GPU;
#            deterministic ops on), with the HF baseline at the same dropout (SDPA drops in-kernel);
#   nondet   mistral with deterministic ops off: the cost of train.deterministic on its own;
#   remat    the upcast regimes as in fast, with model.remat=dots and twice the batch.
# Each writes OUTDIR/<size>-<variant>.json and .txt; one that fails does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0; sizes="small medium"; batch=16; py="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --sizes) sizes="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    -*) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
if [ -z "${out:-}" ]; then echo "usage: $0 [--dry-run] [--sizes \"small medium\"] [--batch B] OUTDIR [-- bench flags]" >&2; exit 2; fi
[ "$dry" = 1 ] || mkdir -p "$out"
status=0
run() {  # run NAME BENCH-ARGS...
  local name="$1"; shift
  local cmd=("$py" -m jaxlm.bench "$@" --out="$out/$name.json")
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'; return; fi
  echo "=== $name" >&2
  PYTHONUNBUFFERED=1 "${cmd[@]}" 2>&1 | tee "$out/$name.txt" || { echo "=== $name failed" >&2; status=1; }
}
for size in $sizes; do
  case "$size" in *.py) cfg="--config=$size"; size="$(basename "$size" .py)" ;; *) cfg="--config=configs/gpt2_$size.py" ;; esac
  fast=(--config.model.attn_pdrop=0.0 --config.train.deterministic=False)
  run "$size-fast" "$cfg" --regimes=bf16,bf16_upcast,fp16_upcast,fp16,fp32 --batch_per_device="$batch" "${fast[@]}" "$@"
  run "$size-mistral" "$cfg" --regimes=bf16_upcast,fp16_upcast --batch_per_device="$batch" "$@"
  run "$size-nondet" "$cfg" --regimes=bf16_upcast,fp16_upcast --batch_per_device="$batch" \
    --config.train.deterministic=False --nobaseline "$@"
  run "$size-remat" "$cfg" --regimes=bf16_upcast,fp16_upcast --batch_per_device="$((2 * batch))" \
    --config.model.remat=dots "${fast[@]}" --nobaseline "$@"
done
exit $status
