#!/usr/bin/env bash
# Inside the image (as root, in a throwaway container, with the checkout at /src read-only):
# run the checkout's test suite against the package INSTALLED in the image, as the image's
# non-root user. Arguments go to pytest.
#   docker run --rm --user root --entrypoint bash -v "$PWD:/src:ro" IMAGE \
#       /src/.circleci/test_in_image.sh [PYTEST ARGS]
set -euo pipefail
# the test extra (pytest, check-jsonschema, ...) into this container's copy of the venv
python - <<'PY' > /tmp/test-requirements.txt
import tomllib
with open("/src/pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["test"]))
PY
pip install -q -r /tmp/test-requirements.txt
# a copy of the checkout whose brainage_bids/ is the installed package, so that the tests
# (which find their data beside them) import and read what the image ships
mkdir /tmp/checkout
tar -C /src --exclude=./.git --exclude=./.venv --exclude=./brainage_bids -cf - . \
    | tar -C /tmp/checkout -xf -
installed=$(python -c "import brainage_bids, os; print(os.path.dirname(brainage_bids.__file__))")
ln -s "$installed" /tmp/checkout/brainage_bids
chown -R brainage /tmp/checkout
cd /tmp/checkout
exec setpriv --reuid brainage --regid brainage --init-groups \
    python -m pytest -p no:cacheprovider "$@"
