#!/usr/bin/env bash
# README command 1: install, convert Fashion-MNIST to shards, pre-train a tiny ViT with MAE on the CPU,
# and print the kNN top-1 of the trained encoder next to the same encoder at random init.
# Extra arguments go to `mimscale pretrain` (e.g. a recipe and key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true
exec .venv/bin/mimscale pretrain "$@"
