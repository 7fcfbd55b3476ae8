#!/usr/bin/env bash
# The tests: set up, lint, build the docs (warnings are errors), then the whole suite (slow
# real-data tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# headless Chromium for the report tests (Debian package; a no-op when present or not root)
bash scripts/install_chromium.sh
. .venv/bin/activate
ruff check .
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
mkdocs build --strict --quiet --site-dir "$site"
python -m pytest "$@"
