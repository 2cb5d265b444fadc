# Sourced by scripts/test.sh and scripts/demo.sh: creates the virtualenv, installs torch and the build tools,
# builds the wheel with `pip wheel` and installs it, so everything runs against the installed package.
#   SR_VENV   virtualenv folder (default .venv)
#   SR_TORCH  torch requirement (default torch==2.13.0, the CPU build; torch==2.14.1 is the CUDA 13 build, which
#             also compiles the CUDA kernels when a CUDA toolkit is found)
#   SR_EXTRA  extra pip requirements for this run
set -euo pipefail
SR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SR_VENV=${SR_VENV:-$SR_ROOT/.venv}
SR_TORCH=${SR_TORCH:-torch==2.13.0}
if [ ! -x "$SR_VENV/bin/python" ]; then
  python3 -m venv "$SR_VENV"
fi
SR_PY="$SR_VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$SR_PY" -m pip install -q "$SR_TORCH" numpy scipy pytest pybind11 scikit-build-core cmake ninja tqdm ${SR_EXTRA:-}
rm -f "$SR_ROOT"/dist/sparse_retrieval-*.whl
(cd "$SR_ROOT" && "$SR_PY" -m pip wheel -q --no-build-isolation --no-deps -w dist .)
"$SR_PY" -m pip install -q --no-deps --force-reinstall "$SR_ROOT"/dist/sparse_retrieval-*.whl
