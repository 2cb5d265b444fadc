#!/usr/bin/env bash
# The test suite against an AddressSanitizer + UndefinedBehaviorSanitizer build of the extension (CPU only): any
# out-of-bounds access, use after free or undefined behaviour in a kernel aborts the run. Uses the .venv that
# scripts/test.sh set up; the sanitized wheel goes to build/asan-site and is imported ahead of the installed one.
# Extra arguments go to pytest (default: the whole suite).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${SR_VENV:-$root/.venv}/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
rm -rf "$root/dist/asan" "$root/build/asan-site"
(cd "$root" && SPARSE_RETRIEVAL_CUDA=OFF "$py" -m pip wheel -q --no-build-isolation --no-deps -w dist/asan . \
  -C build-dir=build/asan -C cmake.build-type=RelWithDebInfo \
  -C "cmake.define.CMAKE_CXX_FLAGS=$flags" -C "cmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined")
"$py" -m pip install -q --no-deps --target "$root/build/asan-site" "$root"/dist/asan/sparse_retrieval-*.whl
# The ASan runtime must come first in the process (python itself is not instrumented), and libstdc++ with it so
# that its operator new/delete pair with ASan's.
preload="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libstdc++.so)"
cd "$root/tests"
# Leaks: CPython and torch keep allocations alive until exit on purpose; they are not what this job looks for.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
LD_PRELOAD="$preload" PYTHONPATH="$root/build/asan-site" "$py" -c \
  "import sparse_retrieval as sr, pathlib; p = pathlib.Path(sr.__file__); print(p); assert 'asan-site' in str(p)"
# pytrec_eval (a third-party extension, only used to cross-check our metrics) aborts under the preloaded runtimes.
LD_PRELOAD="$preload" PYTHONPATH="$root/build/asan-site" "$py" -m pytest -q -p no:cacheprovider \
  --deselect tests/test_metrics.py::test_ranking_metrics_match_trec_eval "${@:-.}"
