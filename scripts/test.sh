#!/bin/sh
# The whole test suite, as CI runs it: installs what it needs (scripts/bootstrap.sh), then pytest.
# Extra arguments go to pytest, e.g. `sh scripts/test.sh -m "not system"` for the fast inner loop.
set -eu
cd "$(dirname "$0")/.."
sh scripts/bootstrap.sh
mkdir -p test-output
exec .venv/bin/python -m pytest -p no:cacheprovider --junitxml=test-output/junit.xml "$@"
