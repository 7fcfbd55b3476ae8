#!/usr/bin/env bash
# The main job: set up, then run brainage-bids on the shipped four-participant IXI sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${1:-out/ixi-sample}
brainage-bids examples/ixi-sample "$OUT" participant -w "${OUT}_work" --nprocs 2 --omp-nthreads 2
brainage-bids examples/ixi-sample "$OUT" group
echo "Done: open $OUT/group_brainage.html, or read $OUT/group_brainage.tsv"
