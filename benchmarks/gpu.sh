#!/usr/bin/env bash
# MAE ViT-L/16 and ViT-H/14 pre-training throughput on a GPU node, measured with `mimscale bench throughput`:
# bf16, ZeRO-1 and ZeRO-3, activation checkpointing off and on, real DeepSpeed engine, synthetic batches
# made by the real transform + mask collate (loader excluded), 5 warm-up + 20 timed steps per configuration,
# each configuration in its own process. Prints img/s, MFU (counted FLOPs / datasheet bf16 peak), peak
# memory, and next to them the `mimscale bench plan` projection (memory, fit, img/s at 45 % MFU).
#
# Target: >= 45 % MFU for MAE ViT-L/16 on one A100/H100-class GPU (the best of the four configurations).
#
#   benchmarks/gpu.sh                 # on a CUDA machine: 1 GPU, both models, 8 configurations
#   GPU_SH_WORLD_SIZE=8 benchmarks/gpu.sh                  # 8 GPUs of this node (torchrun --standalone)
#   GPU_SH_MODELS="mae_vit_l16:96" GPU_SH_ZERO="1" benchmarks/gpu.sh   # a subset / another micro-batch
#   benchmarks/gpu.sh --cpu-smoke     # anywhere: the same script end to end with a micro ViT on CPU
#
# Environment knobs: GPU_SH_MODELS ("recipe:micro_batch ..."; default "mae_vit_l16:64 mae_vit_h14:64"),
# GPU_SH_ZERO ("1 3"), GPU_SH_CKPT ("0 1"), GPU_SH_STEPS (20), GPU_SH_WARMUP (5), GPU_SH_WORLD_SIZE (1),
# GPU_SH_OUT (benchmarks/results), GPU_SH_ARCH_OVERRIDE (replace every recipe's encoder, e.g. vit_micro),
# PYTHON (default: .venv/bin/python of this checkout, else python3).
# Results: $GPU_SH_OUT/throughput-<host>-<date>-<recipe>.json + .svg per model (read by `mimscale report`).
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
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu.sh: error: no CUDA device visible to PyTorch (torch.cuda.is_available() is False): run it on an A100/H100 node, or pass --cpu-smoke" >&2
    exit 3
  fi
  MODELS="${GPU_SH_MODELS:-mae_vit_l16:64 mae_vit_h14:64}"
  ZERO="${GPU_SH_ZERO:-1 3}"; CKPT="${GPU_SH_CKPT:-0 1}"
  STEPS="${GPU_SH_STEPS:-20}"; WARMUP="${GPU_SH_WARMUP:-5}"
  PLAN=(--plan-gpu auto)
  EXTRA=()
  ARCH="${GPU_SH_ARCH_OVERRIDE:-}"
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
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  echo "gpu.sh: CPU smoke run (tiny model; the MFU target applies to the GPU run only)"
fi
WORLD="${GPU_SH_WORLD_SIZE:-1}"
OUT="${GPU_SH_OUT:-benchmarks/results}"
HOST="$("$PY" -c 'import platform; print(platform.node() or "machine")')"
DATE="$(date -u +%Y-%m-%d)"
mkdir -p "$OUT"

FILES=()
for spec in $MODELS; do
  recipe="${spec%%:*}"; mb="${spec##*:}"
  file="$OUT/throughput-$HOST-$DATE-$recipe.json"
  ARCH_ARGS=()
  [ -n "$ARCH" ] && ARCH_ARGS=(--arch "$ARCH")
  echo "== $recipe${ARCH:+ (encoder $ARCH)}: ZeRO {$ZERO} x ckpt {$CKPT}, micro-batch $mb, bf16, $WORLD rank(s)"
  # shellcheck disable=SC2086  # ZERO / CKPT are deliberately word-split into lists
  "$PY" -m mimscale.cli bench throughput --sweep --recipe "$recipe" "${ARCH_ARGS[@]}" --precision bf16 \
      --zero $ZERO --ckpt $CKPT --micro-batch "$mb" --steps "$STEPS" --warmup "$WARMUP" \
      --world-size "$WORLD" "${PLAN[@]}" "${EXTRA[@]}" --out "$file"
  FILES+=("$file")
done

echo "== summary (measured | bench plan projection)"
"$PY" -m mimscale.bench.throughput summary "${FILES[@]}" --target-mfu 0.45 --target-arch vit_large
