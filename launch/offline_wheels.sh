#!/usr/bin/env bash
# Wheels for an air-gapped GPU host, downloaded here (where the package registry answers).
#   launch/offline_wheels.sh [--dry-run] [--python-version 3.12] [--python PY] DIR
# The host is assumed to have JAX with CUDA, Flax, Optax, Orbax, torch, transformers and Triton (and
# what those pull in: numpy, etils, protobuf, PyYAML, huggingface-hub, ...). DIR gets the rest of
# jaxlm's runtime dependencies (also those transformers or optax usually bring, such as tokenizers and
# absl-py: the check installs only the ones the host lacks) and their own needs, as
# binary wheels for CPython <version> on manylinux x86-64, at the versions installed where this runs
# (the versions CI tests), so launch/gpu_check.sh can install them with
# `pip install --no-index --no-deps --target` into a temporary directory, skipping any the host has.
# Not downloaded: tensorflow-datasets, wandb and tensorboard (lazy imports: only a tfds: data source and
# a run through jaxlm.main that logs to wandb or TensorBoard load them; the check's bench and tests drive
# train.Trainer directly, with no telemetry sinks), matplotlib and markdown (plots and the ablation report), pyarrow, fastokens, tiktoken and fsspec (the corpus
# readers and token-cache build of jaxlm.data, which the check never loads). Prints the total size; it should stay under 60 MB.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0; pyver=3.12; py="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --python-version) pyver="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -/{/^set -/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    -*) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
    *) dir="$1"; shift ;;
  esac
done
if [ -z "${dir:-}" ]; then echo "usage: $0 [--dry-run] [--python-version 3.12] DIR" >&2; exit 2; fi
# jaxlm's own runtime dependencies the host lacks, then what they need that the host's packages do not
# bring (grain: cloudpickle, portpicker -> psutil), then pytest and its own needs for the check's tests
# step (pluggy, iniconfig, pygments; packaging comes with transformers). tests/test_launch.py checks this
# list against pyproject.toml, so a new dependency must be placed here or named as the host's.
WHEELS="grain array-record ml-collections sentencepiece tokenizers safetensors absl-py tqdm xxhash cloudpickle portpicker psutil
        pytest pluggy iniconfig pygments"
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # the names are words
pins_text="$("$py" - $WHEELS <<'EOF'
import importlib.metadata as m, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        sys.exit(f"{name} is not installed here: install jaxlm's requirements first")
EOF
)" || exit 1
read -r -a pins <<< "$(echo $pins_text)"
cmd=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp
     "${platforms[@]}" -d "$dir")
status=0
for pin in "${pins[@]}"; do  # one at a time: a wheel missing for this platform is named, the rest still come
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "${cmd[@]}" "$pin"; printf '\n'; continue; fi
  "${cmd[@]}" "$pin" || { echo "no wheel of $pin for CPython $pyver on manylinux x86-64" >&2; status=1; }
done
[ "$dry" = 1 ] && exit 0
ls -1 "$dir"/*.whl 2>/dev/null | sed 's|.*/||' | sort
"$py" - "$dir" <<'EOF'
import pathlib, sys
wheels = list(pathlib.Path(sys.argv[1]).glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
print(f"{len(wheels)} wheels, {total / 1e6:.1f} MB in {sys.argv[1]}" + ("" if total < 60e6 else " (over the 60 MB budget)"))
EOF
exit $status
