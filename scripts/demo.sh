#!/usr/bin/env bash
# README command 1: install, convert Fashion-MNIST to shards, pre-train a tiny ViT with MAE on the CPU,
# print the kNN top-1 of the trained encoder next to the same encoder at random init, and write the
# run's report (report.html, self-contained, opens offline; report.json) into the run directory.
# Extra arguments go to `mimscale pretrain` (e.g. a recipe and key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true
.venv/bin/mimscale pretrain "$@"
# the run directory of this config (runs/tiny_cpu by default), as the engine resolves train.run_dir
run_dir=$(.venv/bin/mimscale pretrain "$@" --print-config | .venv/bin/python -c '
import sys, yaml
c = yaml.safe_load(sys.stdin)
print(c["train"]["run_dir"].format(objective=c["objective"]["name"], arch=c["model"]["arch"]))')
.venv/bin/mimscale report "$run_dir"
echo "Open $run_dir/report.html in a browser to see the run's table and curves."
