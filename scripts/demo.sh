#!/bin/sh
# The main job on a built-in default: a real Cyrus primary+replica under a real (throwaway)
# systemd, mail load, `systemctl stop`, the drain and the proof; then a stock unit for comparison.
# Installs what it needs (scripts/bootstrap.sh). Extra arguments go to the demo (--help).
set -eu
cd "$(dirname "$0")/.."
sh scripts/bootstrap.sh
exec .venv/bin/python -m testbed.demo "$@"
