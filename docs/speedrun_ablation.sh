#!/bin/bash
# Issue 39's ablation: the speedrun recipe (configs/speedrun.py) with one switch at a time set back to
# the tiny config's value, and the whole recipe, two runs at a time (one pinned to each core, one XLA
# thread each), under a budget of CPU seconds, as docs/equal_budget_study.sh runs its pairs.
#   docs/speedrun_ablation.sh OUT BUDGET SEED          e.g. docs/speedrun_ablation.sh /tmp/ablation 2m 21
set -euo pipefail
OUT=$1; BUDGET=$2; S=$3
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
C=(--config.log.stats_every=0 --config.log.wandb_mode=disabled --config.train.eval_every=50
   --config.train.eval_batches=16 "--config.train.budget=$BUDGET" --config.train.budget_clock=process
   "--config.checkpoint.stages=((1000000, 1000000),)" --config.train.seed="$S")
variants=(
  "speedrun:"
  "no_muon:--config.optim.muon=False"
  "no_rope:--config.model.rope=False"
  "no_qk_norm:--config.model.qk_norm=False"
  "gelu:--config.model.mlp_kind=gelu"
  "no_zero_init:--config.model.zero_init_proj=False"
  "tied_head:--config.model.tie_word_embeddings=True"
  "no_softcap:--config.model.logit_softcap=0.0"
  "no_ln_embed:--config.model.ln_embed=False"
  "linear_decay:--config.optim.schedule=linear"
)
core=0
for v in "${variants[@]}"; do
  name=${v%%:*}; extra=${v#*:}
  # shellcheck disable=SC2086
  taskset -c $core python -m jaxlm.main --config=configs/speedrun.py --workdir="$OUT/cells/$name-s$S" "${C[@]}" \
    $extra > "$OUT/$name-s$S.log" 2>&1 &
  core=$((1 - core))
  if [ $core = 0 ]; then wait; fi
done
wait
