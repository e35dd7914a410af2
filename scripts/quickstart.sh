#!/usr/bin/env bash
# Runs the quickstart on this machine: the example manifests through the local runtime.
set -euo pipefail
source "$(dirname "$0")/env.sh" "local"
cd "$ROOT"
exec llmops run -f examples/quickstart.yaml "$@"
