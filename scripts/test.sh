#!/usr/bin/env bash
# Sets up .venv (torch, build tools, the package built as a wheel) and runs the test suite against the installed
# package. Extra arguments go to pytest.
# Test-only requirements: transformers for the KV-cache tests (a tiny random Llama, no downloads), sentence-transformers
# for the interoperation tests (a tiny random SparseEncoder),
# pytrec-eval-terrier to cross-check the ranking metrics and hypothesis for the property-based tests.
SR_EXTRA="transformers==5.23.0 sentence-transformers==6.2.0 pytrec-eval-terrier hypothesis ${SR_EXTRA:-}"
set -euo pipefail
source "$(dirname "$0")/env.sh"
# Run from tests/ so that the installed wheel is imported, never the source folder.
cd "$SR_ROOT/tests"
"$SR_PY" -c "import sparse_retrieval as sr; print(sr.build_info())"
"$SR_PY" -m pytest -q "$@"
