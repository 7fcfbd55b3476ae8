#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for tests/test_browser.py (the report checks).
#
# A no-op when Chromium is already there, when not running as root, or without apt-get:
# the browser test then skips with its reason. Never downloads a browser build of its own.
set -euo pipefail

for binary in chromium chromium-browser; do
    if command -v "$binary" >/dev/null 2>&1; then
        echo "install_chromium: $(command -v "$binary") is already installed"
        exit 0
    fi
done
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium: not root: skipping (tests/test_browser.py will be skipped)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get: skipping (tests/test_browser.py will be skipped)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# fonts: without recommends Chromium may have none, and the screenshots would show no text
PACKAGES=(chromium fonts-dejavu-core fonts-liberation)
# the package lists may be missing or stale on a fresh machine
if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y --no-install-recommends "${PACKAGES[@]}"
fi
echo "install_chromium: installed $(command -v chromium)"
