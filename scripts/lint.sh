#!/usr/bin/env bash
# Lint, format and type checks (CI runs this before the tests): ruff check, ruff format --check, mypy.
# Uses the venv that scripts/setup.sh --test makes (it installs the lint extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MIMSCALE_VENV:-.venv}/bin
"$PY/ruff" check mimscale tests benchmarks docs
"$PY/ruff" format --check mimscale tests benchmarks docs
"$PY/mypy"
echo "[lint] ruff and mypy clean"
