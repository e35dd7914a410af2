#!/usr/bin/env bash
# Runs every check and every test tier: lint, types, import layers, then unit, cluster, trainer
# and e2e tests.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m unit`).
set -euo pipefail
source "$(dirname "$0")/env.sh" "dev,local"
cd "$ROOT"

echo "==> ruff"
ruff check .
ruff format --check .
echo "==> mypy"
mypy
echo "==> import-linter"
lint-imports

echo "==> control plane components (built from upstream Go modules, cached)"
python tests/cluster/build_components.py

echo "==> pytest"
set +e
python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
    # No test selected: an error for the full suite, fine for a filtered run.
    echo "pytest selected no tests" >&2
    [ "$#" -gt 0 ] && exit 0
    exit 1
fi
exit "$code"
