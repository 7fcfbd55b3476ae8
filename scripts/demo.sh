#!/usr/bin/env bash
# The main job: set up, then run brainage-bids on the shipped four-participant IXI sample.
#   bash scripts/demo.sh [OUTPUT_DIR] [MODEL]     (MODEL: a shipped name or a models/ folder)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${1:-out/ixi-sample}
MODEL=${2:-default}
brainage-bids examples/ixi-sample "$OUT" participant -w "${OUT}_work" --model "$MODEL" \
    --nprocs 2 --omp-nthreads 1
brainage-bids examples/ixi-sample "$OUT" group --model "$MODEL"
echo "Done: open $OUT/group_brainage.html, or read $OUT/group_brainage.tsv"
