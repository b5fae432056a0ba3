#!/bin/sh
# The whole test suite, as CI runs it: installs what it needs (scripts/bootstrap.sh), then pytest.
# Extra arguments go to pytest, e.g. `sh scripts/test.sh -m "not system"` for the fast inner loop.
set -eu
cd "$(dirname "$0")/.."
sh scripts/bootstrap.sh
mkdir -p test-output
# The soak (tests/system/test_soak.py, ~15 s a cycle here): 10 cycles in CI keep the whole run well
# under its 30 minutes; each cycle repeats the same four transitions. By hand: 20 or more.
export CYRUSHELPER_SOAK_CYCLES="${CYRUSHELPER_SOAK_CYCLES:-10}"
exec .venv/bin/python -m pytest -p no:cacheprovider --junitxml=test-output/junit.xml "$@"
