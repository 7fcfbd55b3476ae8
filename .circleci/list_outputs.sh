#!/usr/bin/env bash
# The sorted list of files under an OUTPUT_DIR, with each run's id replaced by <run>, so
# that two runs of the same levels on the same data give the same list. CI compares it with
# .circleci/expected_outputs.txt; regenerate that after a change to the outputs with
#   bash scripts/demo.sh /tmp/demo-out [MODEL] && bash .circleci/list_outputs.sh /tmp/demo-out \
#       > .circleci/expected_outputs.txt
# (the file names do not depend on the model).
set -euo pipefail
out=${1:?usage: list_outputs.sh OUTPUT_DIR}
cd "$out"
# logs/{brainage,config,summary}-<12 hex digits>.{log,toml,json}: one id per run
find . -type f -printf '%P\n' \
    | sed -E 's#^(logs/[a-z]+-)[0-9a-f]{12}(\.[a-z]+)$#\1<run>\2#' \
    | LC_ALL=C sort
