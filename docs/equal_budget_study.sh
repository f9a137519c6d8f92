#!/bin/bash
# Issue 39's equal-budget study on the tiny config: Mistral's recipe (configs/tiny.py) against the
# speedrun's (configs/speedrun.py), one pair per seed, the pair's two runs at the same time, one pinned
# to each core with one XLA thread, under a budget of CPU seconds (train.budget_clock=process: the
# machine's other load does not decide the winner). Evaluation every 50 steps (not charged).
#   docs/equal_budget_study.sh OUT BUDGET SEED...     e.g. docs/equal_budget_study.sh /tmp/study 3m 21 49 81
#   EXTRA="--config.model.rope=False" NAME=speedrun-norope docs/equal_budget_study.sh ...  (one switch off, alone)
set -euo pipefail
OUT=$1; BUDGET=$2; shift 2
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
C=(--config.log.stats_every=0 --config.log.wandb_mode=disabled --config.train.eval_every=50
   --config.train.eval_batches=16 "--config.train.budget=$BUDGET" --config.train.budget_clock=process
   "--config.checkpoint.stages=((1000000, 1000000),)")
NAME=${NAME:-speedrun}
for S in "$@"; do
  if [ -z "${EXTRA:-}" ]; then
    taskset -c 1 python -m jaxlm.main --config=configs/tiny.py --workdir="$OUT/cells/mistral-s$S" "${C[@]}" \
      --config.train.seed="$S" --config.train.steps=1000000 > "$OUT/mistral-s$S.log" 2>&1 &
  fi
  # shellcheck disable=SC2086
  taskset -c 0 python -m jaxlm.main --config=configs/speedrun.py --workdir="$OUT/cells/$NAME-s$S" "${C[@]}" \
    --config.train.seed="$S" ${EXTRA:-} > "$OUT/$NAME-s$S.log" 2>&1 &
  wait
done
