#!/usr/bin/env bash
# Mutation testing of algo/, rewards/ and the kernels' torch paths (docs/testing.md). Not run in CI:
# every mutant runs a file's unit tests, so the whole set takes CPU-hours on a small machine.
# Arguments go to scripts/mutation.py (--files, --lines, --match, --tests, --list, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 19 python scripts/mutation.py "$@"
