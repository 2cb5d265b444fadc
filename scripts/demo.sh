#!/usr/bin/env bash
# Sets up .venv like scripts/test.sh and runs the main demo; results go to bench/results/.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$SR_ROOT"
"$SR_PY" bench/bench_search.py "$@"
