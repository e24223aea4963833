#!/usr/bin/env bash
# README command 2: install everything (including SLURM and Chromium) and run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick subset). --durations=20 ends the log with the
# twenty slowest test phases (tests/README.md keeps the list; conftest.py's time guard holds each test to 120 s
# of CPU unless it is allowed more; MIMSCALE_TEST_LIMIT_S=0 turns the guard off on a busy machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export WANDB_MODE=offline WANDB_SILENT=true
# Two pytest-xdist workers by default (the SLURM tests mostly wait, launches mostly import: two share two cores
# well); tests/conftest.py keeps each group of tests that shares a fixture on one worker and runs the longest
# first. MIMSCALE_TEST_WORKERS=0 runs everything in this one process (e.g. with -x or a debugger).
workers=${MIMSCALE_TEST_WORKERS:-2}
parallel=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --no-loadscope-reorder)
exec .venv/bin/python -m pytest -q --durations=20 "${parallel[@]}" "$@"
