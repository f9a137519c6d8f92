#!/usr/bin/env bash
# Issue 20's CPU study (STUDIES.md): a fractional design, run as several grids into two output
# directories, most informative cells first (finished cells are skipped: rerunning resumes).
#   bash docs/study_cpu.sh OUT      (OUT/deep: layer scaling on the 6-layer preset; OUT/sweep: the LR sweep)
set -euo pipefail
OUT=${1:?usage: bash docs/study_cpu.sh OUT}
LRS=1e-3,3e-3,1e-2,3e-2,1e-1
deep() { python -m jaxlm.ablate --config=configs/stress_fp16_deep.py --config.log.wandb_mode=disabled \
    --config.data.cache_dir="$OUT/data" --out="$OUT/deep" --seeds=21 "$@"; }
sweep() { python -m jaxlm.ablate --config=configs/stress_fp16.py --config.log.wandb_mode=disabled \
    --config.data.cache_dir="$OUT/data" --out="$OUT/sweep" --steps=40 --lrs=$LRS "$@"; }

# 1. Does layer scaling alone remove fp16's overflow? 6 layers, lr 3e-2 (the preset's), seed 21.
deep --regimes=fp16 --layer-scaling=none,hf,megatron
# 2. LR sweep on the 2-layer preset (HF layer scaling, as the preset has it), 40 steps, 5 LRs, seed 21.
sweep --seeds=21 --regimes=fp32,fp16,fp8,bf16
sweep --seeds=21 --regimes=fp16 --switch=model.qk_norm=on
sweep --seeds=21 --regimes=fp32 --switch=model.z_loss=1e-4
sweep --seeds=21 --regimes=fp32 --switch=model.qk_norm=on
sweep --seeds=21 --regimes=fp16_upcast
# 3. The 6-layer preset's references: qk_norm without upcasting, and the upcast fix.
deep --regimes=fp16 --layer-scaling=none --switch=model.qk_norm=on
deep --regimes=fp16_upcast --layer-scaling=none
# 4. A second seed for the main sweep configurations.
sweep --seeds=49 --regimes=fp32,fp16,fp8,bf16
sweep --seeds=49 --regimes=fp16 --switch=model.qk_norm=on
