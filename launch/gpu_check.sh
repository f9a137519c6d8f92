#!/usr/bin/env bash
# Issue 25's GPU targets in one command, on one fresh (even air-gapped) GPU host, in under 8 minutes.
#   launch/gpu_check.sh [--dry-run] [--wheels DIR] [--python PY] [--steps N] [--with-medium] OUTDIR
# 1. setup: the wheels in DIR (default .whl, from launch/offline_wheels.sh) that the host's Python
#    lacks go into a temporary --target directory on PYTHONPATH (the host's packages are not touched);
# 2. tests/test_gpu.py (JUnit report in OUTDIR/test_gpu.xml);
# 3. python -m jaxlm.bench on gpt2_small, batch 16 x 1024, each run with its same-recipe torch row:
#    recipe    the Mistral recipe as configured (attention dropout 0.1, deterministic ops), fp16_upcast;
#    dropout0  every dropout 0 (as llm.c trains), deterministic ops off, fp16_upcast and bf16_upcast,
#              HF + torch.compile beside it, and a 3-step profile (kernel time against step time);
#    fp8       the dropout0 settings in the fp8 regime, its compiled HLO kept to count cuBLASLt f8 GEMMs;
#    --with-medium adds recipe and dropout0 for gpt2_medium (about 4 more minutes: past the 8);
# 4. the measured/target table (launch/gpu_report.py), printed last and kept in OUTDIR/report.txt;
#    OUTDIR/results.tar.gz holds the JSONs, logs and reports (not the compile cache or the traces).
# JAX's persistent compile cache lives in OUTDIR/jax_cache: a second run with the same OUTDIR
# compiles from it, and the table says its compile times are cache hits. Each step has a time limit;
# one that fails or runs out of time does not stop the others. --dry-run prints the plan and the
# projected minutes.
set -uo pipefail
here="$(pwd)"
cd "$(dirname "$0")/.."
repo="$(pwd)"
dry=0; wheels="$repo/.whl"; py="${PYTHON:-python3}"; steps=8; medium=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --with-medium) medium=1; shift ;;
    -h|--help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    -*) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
if [ -z "${out:-}" ]; then echo "usage: $0 [--dry-run] [--wheels DIR] [--with-medium] OUTDIR" >&2; exit 2; fi
case "$out" in /*) ;; *) out="$here/$out" ;; esac  # relative paths are the caller's
case "$wheels" in /*) ;; *) wheels="$here/$wheels" ;; esac

bench=("$py" -m jaxlm.bench --batch_per_device=16 --steps="$steps" --warmup=2)
nodrop=(--config.model.attn_pdrop=0.0 --config.model.resid_pdrop=0.0 --config.model.embd_pdrop=0.0
        --config.train.deterministic=False)
names=(); limits=(); projected=(); cmds=()
step() {  # step NAME LIMIT_S PROJECTED_S COMMAND...: one line of the plan
  names+=("$1"); limits+=("$2"); projected+=("$3"); shift 3
  cmds+=("$(printf ' %q' "$@")")
}
step tests 80 70 env JAX_PLATFORMS=cuda,cpu "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  --junitxml="$out/test_gpu.xml"
sizes=small; [ "$medium" = 1 ] && sizes="small medium"
for size in $sizes; do
  # projected: interpreter start, torch.compile's first step (~45 s), ~35 s per JAX compile, the steps
  step "$size-recipe" 110 95 "${bench[@]}" --config="configs/gpt2_$size.py" --regimes=fp16_upcast \
    --out="$out/$size-recipe.json"
  step "$size-dropout0" 140 130 "${bench[@]}" --config="configs/gpt2_$size.py" --regimes=fp16_upcast,bf16_upcast \
    "${nodrop[@]}" --profile="$out/prof" --out="$out/$size-dropout0.json"
  if [ "$size" = small ]; then
    step "$size-fp8" 60 50 "${bench[@]}" --config="configs/gpt2_$size.py" --regimes=fp8 "${nodrop[@]}" --nobaseline \
      --hlo_dir="$out/hlo" --out="$out/$size-fp8.json"
  fi
done

# the worst case: the setup (wheels, the device query: 30 s), every step at its limit plus the seconds
# `timeout --kill-after` grants it, and the report with its tarball (10 s)
kill_after=5
total_p=15; total_l=$((30 + 10))
for i in "${!names[@]}"; do total_p=$((total_p + projected[i])); total_l=$((total_l + limits[i] + kill_after)); done
minutes() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 60 }'; }
if [ "$dry" = 1 ]; then
  echo "# setup: install the wheels of $wheels the host lacks into a temporary --target directory; PYTHONPATH=$repo:<it>"
  echo "# JAX_COMPILATION_CACHE_DIR=$out/jax_cache"
  for i in "${!names[@]}"; do
    echo "# step ${names[i]}: projected $(minutes "${projected[i]}") min, limit $(minutes "${limits[i]}") min"
    echo "+${cmds[i]}"
  done
  echo "+$(printf ' %q' "$py" launch/gpu_report.py "$out" $sizes)"
  echo "projected: $(minutes $total_p) minutes (every step at its limit: $(minutes $total_l), kill-after and report included)"
  exit 0
fi

mkdir -p "$out/jax_cache" "$out/hlo" "$out/prof"
t0=$SECONDS
# --- setup: wheels the host lacks, into a temporary directory on PYTHONPATH ---
site="$(mktemp -d)/site"
if [ -d "$wheels" ]; then
  need="$("$py" - "$wheels" <<'EOF'
import importlib.metadata as md, pathlib, sys
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = w.name.split("-")[0]
    try:
        print(f"host has {name} {md.version(name)}: kept", file=sys.stderr)
    except md.PackageNotFoundError:
        print(w)
EOF
)"
  if [ -n "$need" ]; then
    # shellcheck disable=SC2086  # one wheel path per word
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $need \
      || echo "=== setup: installing the wheels failed" >&2
  fi
else
  echo "=== setup: no wheel directory $wheels (launch/offline_wheels.sh makes one); using the host's packages" >&2
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$out/jax_cache" PYTHONUNBUFFERED=1
"$py" - "$out" <<'EOF'
import importlib.metadata as md, json, os, subprocess, sys
out = sys.argv[1]
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
except (OSError, subprocess.TimeoutExpired):
    smi = []
versions = {}
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "triton", "grain", "ml-collections"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
meta = {"device": smi[0] if smi else None, "gpus": smi, "versions": versions, "python": sys.version.split()[0],
        "cache_entries_at_start": len(os.listdir(os.path.join(out, "jax_cache")))}
json.dump(meta, open(os.path.join(out, "meta.json"), "w"), indent=2)
print(f"device: {meta['device']}; python {meta['python']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
EOF
echo "=== setup done in $((SECONDS - t0)) s" >&2

for i in "${!names[@]}"; do
  t=$SECONDS
  echo "=== ${names[i]} (limit ${limits[i]} s)" >&2
  eval "timeout --kill-after=$kill_after ${limits[i]}${cmds[i]}" 2>&1 | tee "$out/${names[i]}.txt"
  echo "=== ${names[i]}: exit ${PIPESTATUS[0]} after $((SECONDS - t)) s (total $((SECONDS - t0)) s)" >&2
done

# shellcheck disable=SC2086  # the sizes are words
"$py" launch/gpu_report.py "$out" $sizes > "$out/report.txt" 2>&1
(cd "$out" && tar czf results.tar.gz --exclude=jax_cache --exclude='prof/*/*' --exclude=results.tar.gz \
  ./*.json ./*.txt ./*.xml hlo prof 2>/dev/null)
echo "=== all steps in $((SECONDS - t0)) s; $out/results.tar.gz" >&2
cat "$out/report.txt"
