#!/usr/bin/env bash
# A GPU check that fits a short slot (~6 min on one H100/H200, process starts included), in two parts:
#  1. throughput: MAE ViT-L/16 (ZeRO-1/3 x activation checkpointing off/on) and ViT-H/14 (ZeRO-1, ckpt
#     off/on), bf16, with `mimscale bench throughput`: real DeepSpeed engine, synthetic batches made by the
#     real transform + mask collate (loader excluded), 5 warm-up + 20 timed steps, each configuration in its
#     own process; img/s, MFU (counted FLOPs / datasheet bf16 peak), peak memory, and the `bench plan`
#     projection beside them;
#  2. the real train path: `mimscale pretrain` of MAE ViT-L/16 (bf16, ZeRO-1, 60 steps + warm-up) on
#     generated JPEG shards, through benchmarks/loop_overhead.py: the loop's img/s, MFU and peak memory, and
#     loop / bench on the same shards (the whole Trainer vs the bare step).
# By default the CUDA compiler is hidden (nvcc off PATH, CUDA_HOME pointing nowhere): the run proves that a
# node with only a driver and our venv trains (GPU_SH_HIDE_NVCC=0 keeps them).
#
# Target: >= 45 % MFU for MAE ViT-L/16 on one A100/H100-class GPU (the best of its configurations).
#
#   benchmarks/gpu.sh                 # on a CUDA machine: 1 GPU, both models, 8 configurations
#   GPU_SH_WORLD_SIZE=8 benchmarks/gpu.sh                  # 8 GPUs of this node (torchrun --standalone)
#   GPU_SH_MODELS="mae_vit_l16:96" GPU_SH_ZERO="1" benchmarks/gpu.sh   # a subset / another micro-batch
#   benchmarks/gpu.sh --cpu-smoke     # anywhere: the same script end to end with a micro ViT on CPU
#
# Environment knobs: GPU_SH_MODELS ("recipe:micro_batch[:zeros[:ckpts]] ...", lists comma-separated;
# default "mae_vit_l16:128:1,3:0,1 mae_vit_h14:64:1:0,1"), GPU_SH_ZERO / GPU_SH_CKPT (the lists where a model
# names none; "1 3" / "0 1"), GPU_SH_STEPS (20), GPU_SH_WARMUP (5), GPU_SH_WORLD_SIZE (1), GPU_SH_LOOP (1: run
# part 2), GPU_SH_LOOP_STEPS (60; --cpu-smoke 2), GPU_SH_LOOP_WORKERS (loader workers per rank; default cores/ranks - 2),
# GPU_SH_OUT (benchmarks/results), GPU_SH_ARCH_OVERRIDE (replace every recipe's encoder, e.g. vit_micro),
# PYTHON (default: .venv/bin/python of this checkout, else python3).
# Results: $GPU_SH_OUT/throughput-<host>-<date>-<recipe>.json + .svg per model (shown by `mimscale report ... --bench`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=smoke ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: error: unknown argument '$arg' (use --cpu-smoke or --help)" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = gpu ]; then
  # usable CUDA, or one line: no GPU at all, or GPUs nvidia-smi lists that torch cannot use (e.g. an old driver)
  "$PY" benchmarks/cuda_check.py gpu.sh || exit 3
  MODELS="${GPU_SH_MODELS:-mae_vit_l16:128:1,3:0,1 mae_vit_h14:64:1:0,1}"
  ZERO="${GPU_SH_ZERO:-1 3}"; CKPT="${GPU_SH_CKPT:-0 1}"
  STEPS="${GPU_SH_STEPS:-20}"; WARMUP="${GPU_SH_WARMUP:-5}"
  PLAN=(--plan-gpu auto)
  EXTRA=()
  ARCH="${GPU_SH_ARCH_OVERRIDE:-}"
  LOOP_ARGS=(--recipe mae_vit_l16 --micro-batch 128 --precision bf16 --zero 1 --generate 2048
             --steps "${GPU_SH_LOOP_STEPS:-60}" --log-every 10 --skip 2)
  if [ "${GPU_SH_HIDE_NVCC:-1}" = 1 ]; then     # prove the no-compiler promise instead of hiding it
    PATH="$(printf '%s' "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || printf '%s:' "$d"; done)"
    export PATH="${PATH%:}" CUDA_HOME=/nonexistent-cuda-home CUDA_PATH=/nonexistent-cuda-home
    command -v nvcc >/dev/null && { echo "gpu.sh: error: nvcc is still on PATH" >&2; exit 3; }
    echo "gpu.sh: CUDA compiler hidden (no nvcc on PATH, CUDA_HOME=$CUDA_HOME)"
  fi
else
  # Same recipes, flags and code path, shrunk to seconds on a CPU: micro ViT on 32 px, small decoder,
  # one configuration (ZeRO-3 + checkpointing: the most machinery), bf16 as on the GPU.
  MODELS="${GPU_SH_MODELS:-mae_vit_l16:4}"
  ZERO="${GPU_SH_ZERO:-3}"; CKPT="${GPU_SH_CKPT:-1}"
  STEPS="${GPU_SH_STEPS:-2}"; WARMUP="${GPU_SH_WARMUP:-1}"
  PLAN=(--plan-gpu a100-80gb)
  EXTRA=(--img 32 --patch 4 --set objective.decoder_dim=32 --set objective.decoder_depth=1
         --set objective.decoder_heads=2)
  ARCH="${GPU_SH_ARCH_OVERRIDE:-vit_micro}"
  # part 2 at its smallest: 1 warm-up + 2 timed steps (one timing window), 64 generated JPEGs
  LOOP_ARGS=(--recipe mae_vit_l16 --micro-batch 8 --precision bf16 --zero 1 --generate 64
             --steps "${GPU_SH_LOOP_STEPS:-2}" --log-every 1 --skip 1 --set model.arch=vit_micro
             --set model.img_size=32 --set model.patch_size=4 --set objective.decoder_dim=32
             --set objective.decoder_depth=1 --set objective.decoder_heads=2)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  echo "gpu.sh: CPU smoke run (tiny model; the MFU target applies to the GPU run only)"
fi
WORLD="${GPU_SH_WORLD_SIZE:-1}"
OUT="${GPU_SH_OUT:-benchmarks/results}"
HOST="$("$PY" -c 'import platform; print(platform.node() or "machine")')"
DATE="$(date -u +%Y-%m-%d)"
mkdir -p "$OUT"

START=$SECONDS
FILES=()
for spec in $MODELS; do
  IFS=: read -r recipe mb zeros ckpts <<<"$spec"
  ZS="${zeros:-$ZERO}"; CS="${ckpts:-$CKPT}"; ZS="${ZS//,/ }"; CS="${CS//,/ }"
  file="$OUT/throughput-$HOST-$DATE-$recipe.json"
  ARCH_ARGS=()
  [ -n "$ARCH" ] && ARCH_ARGS=(--arch "$ARCH")
  echo "== $recipe${ARCH:+ (encoder $ARCH)}: ZeRO {$ZS} x ckpt {$CS}, micro-batch $mb, bf16, $WORLD rank(s)"
  # shellcheck disable=SC2086  # ZS / CS are deliberately word-split into lists
  "$PY" -m mimscale.cli bench throughput --sweep --recipe "$recipe" "${ARCH_ARGS[@]}" --precision bf16 \
      --zero $ZS --ckpt $CS --micro-batch "$mb" --steps "$STEPS" --warmup "$WARMUP" \
      --world-size "$WORLD" "${PLAN[@]}" "${EXTRA[@]}" --out "$file"
  FILES+=("$file")
done

echo "== throughput done in $((SECONDS - START)) s"
if [ "${GPU_SH_LOOP:-1}" = 1 ]; then
  cores="$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')"
  workers="${GPU_SH_LOOP_WORKERS:-$(( cores / WORLD > 3 ? cores / WORLD - 2 : 1 ))}"
  echo "== the real train path: mimscale pretrain vs bench on the same shards ($WORLD rank(s), $workers workers)"
  "$PY" benchmarks/loop_overhead.py "${LOOP_ARGS[@]}" --ranks "$WORLD" --workers "$workers" --repeats 1 \
      --no-synthetic --name gpu_loop --out-dir "$OUT"
fi
echo "== summary (measured | bench plan projection), $((SECONDS - START)) s in all"
"$PY" -m mimscale.bench.throughput summary "${FILES[@]}" --target-mfu 0.45 --target-arch vit_large
