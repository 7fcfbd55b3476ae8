#!/usr/bin/env bash
# Create ./.venv and install brainage-bids (editable) with its test and docs tools. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Install torch before anything that depends on it: an unpinned torch would fetch a newer
# build with gigabytes of CUDA packages. An existing torch is kept. PyPI's Linux torch is a
# CUDA build itself: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU one.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
python -m pip install -q -e ".[test,docs]"
