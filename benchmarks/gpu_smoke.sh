#!/usr/bin/env bash
# The GPU smoke check (<= 5 min on one H100/H200): every objective's B/16 recipe through the real Trainer
# (`python -m mimscale.train <name>_vit_b16`, micro-batch 32, bf16, ZeRO-1, device JPEG decode where the
# objective allows it, two logging intervals), MAE once more at ZeRO-3, then MAE with a kNN evaluation at the
# end, interrupted by SIGUSR1 (save, exit 42), resumed by the same command, its losses compared with the
# uninterrupted run's. Data, teacher and targets are made on the spot (no network, no data set): see
# benchmarks/gpu_smoke.py. Writes $GPU_SMOKE_OUT/gpu_smoke-<GPU name>-<date>.json naming the machine.
#
#   benchmarks/gpu_smoke.sh                 # on a CUDA machine
#   benchmarks/gpu_smoke.sh --cpu-smoke     # anywhere: the same script end to end with a micro ViT on CPU
#
# Knobs: GPU_SMOKE_OUT (benchmarks/results), GPU_SMOKE_OBJECTIVES (comma-separated subset), GPU_SMOKE_MB
# (micro-batch), GPU_SMOKE_LOG_EVERY, GPU_SMOKE_PARALLEL (runs side by side on the GPU; default 3),
# PYTHON (default: .venv/bin/python of this checkout, else python3).
# The CUDA compiler is hidden as in gpu.sh (GPU_SH_HIDE_NVCC=0 keeps it): no JIT op may be needed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

ARGS=()
MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=smoke; ARGS+=(--cpu-smoke) ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_smoke.sh: error: unknown argument '$arg' (use --cpu-smoke or --help)" >&2; exit 2 ;;
  esac
done
if [ "$MODE" = gpu ]; then
  "$PY" benchmarks/cuda_check.py gpu_smoke.sh || exit 3
  if [ "${GPU_SH_HIDE_NVCC:-1}" = 1 ]; then
    PATH="$(printf '%s' "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || printf '%s:' "$d"; done)"
    export PATH="${PATH%:}" CUDA_HOME=/nonexistent-cuda-home CUDA_PATH=/nonexistent-cuda-home
  fi
fi
[ -n "${GPU_SMOKE_OBJECTIVES:-}" ] && ARGS+=(--objectives "$GPU_SMOKE_OBJECTIVES")
[ -n "${GPU_SMOKE_MB:-}" ] && ARGS+=(--micro-batch "$GPU_SMOKE_MB")
[ -n "${GPU_SMOKE_LOG_EVERY:-}" ] && ARGS+=(--log-every "$GPU_SMOKE_LOG_EVERY")
[ -n "${GPU_SMOKE_PARALLEL:-}" ] && ARGS+=(--parallel "$GPU_SMOKE_PARALLEL")
exec "$PY" benchmarks/gpu_smoke.py --out "${GPU_SMOKE_OUT:-benchmarks/results}" "${ARGS[@]}"
