#!/usr/bin/env bash
# For a lent GPU machine (no package registry there): builds against the torch already installed, runs the whole
# test suite (CUDA tests included), the CUDA tests again under compute-sanitizer (memcheck; racecheck on the fused
# CQ attention), and the benchmarks
# (each runs its GPU part when CUDA is available), writing everything under OUTDIR and a summary last.
#   [GPU_TESTS=..] [GPU_SANITIZE=..] [GPU_RACECHECK=..] bash scripts/gpu_run.sh OUTDIR [bench names]  (pytest args)
# GPU_TESTS narrows the suite (default: all of it, at most GPU_TESTS_TIMEOUT=240 s), GPU_SANITIZE the sanitized
# tests (default: -k cuda); the benches default to every bench/bench_*.py. Next check, of the three opt-in kernels
# that have never run on a GPU (fused CQ attention, one-read top-k, one-launch search; about 6 minutes):
#   GPU_TESTS="test_cq.py test_topk.py test_index.py" GPU_SANITIZE="test_cq.py test_topk.py test_index.py -k cuda" \
#     GPU_SCALE=8841823 bash scripts/gpu_run.sh OUT bench_cq bench_topk bench_search
# (GPU_SCALE: also batched search over that many synthetic documents, GPU methods only.)
set -uo pipefail
out=${1:?usage: gpu_run.sh OUTDIR [bench ...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
cd "$root"
rm -rf dist/gpu
SPARSE_RETRIEVAL_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  python3 -m pip wheel -q --no-build-isolation --no-deps -w dist/gpu . -C build-dir=build/gpu > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
python3 -m pip install -q --no-deps --force-reinstall dist/gpu/sparse_retrieval-*.whl >> "$out/build.log" 2>&1
# pytest-xdist, where installed, cuts the suite to about 1.5 minutes on the lent 16-core machines.
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
# Bounded: a hung test (the whole suite once hung at 90% there, 2026-11-30) must not eat the session's device time.
(cd tests && timeout "${GPU_TESTS_TIMEOUT:-240}" python3 -m pytest -q -rs $par ${GPU_TESTS:-} > "$out/tests.log" 2>&1)
echo "tests: $(tail -1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20
(cd tests && timeout 120 compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -x ${GPU_SANITIZE:--k cuda} \
   > "$out/sanitizer.log" 2>&1)
echo "compute-sanitizer memcheck: $(grep -E "ERROR SUMMARY" "$out/sanitizer.log" | tail -1); $(tail -1 "$out/sanitizer.log")"
# Shared-memory races of the block-phase kernels (the fused CQ attention's merge had one, found this way): the
# opt-in kernels' tests on small inputs.
(cd tests && timeout 120 compute-sanitizer --tool racecheck --print-limit 10 python3 -m pytest -q -x \
   ${GPU_RACECHECK:-test_cq.py test_topk.py test_index.py -k "(cuda-fused and (matches_reference or starts)) or (cuda_one_read_small and randn-dtype0) or cuda_search_one_launch"} \
   > "$out/racecheck.log" 2>&1)
echo "compute-sanitizer racecheck: $(grep -E "RACECHECK SUMMARY" "$out/racecheck.log" | tail -1); $(tail -1 "$out/racecheck.log")"
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=($(cd bench && ls bench_*.py | sed 's/\.py$//'))
# Sizes that fit a device session: no data cache there, and the CPU-only parts are measured on the dev machine.
declare -A bench_args=([bench_topk]="--quick" [bench_cq]="--cuda"
                       [bench_search]="--synthetic --docs 200000 --no-manpages --no-seismic --peer-queries 20")
for b in "${benches[@]}"; do
  (cd bench && timeout 300 python3 "$b.py" ${bench_args[$b]:-} > "$out/$b.log" 2>&1) || echo "$b failed or timed out"
done
# Batched search at MS MARCO size (GPU methods only; documents drawn on the GPU) when GPU_SCALE is set.
if [ -n "${GPU_SCALE:-}" ]; then
  (cd bench && timeout 300 python3 bench_search.py --gpu-scale "$GPU_SCALE" --queries 1024 > "$out/bench_search_scale.log" 2>&1) \
    || echo "bench_search --gpu-scale failed or timed out"
  benches+=(bench_search_scale)
fi
cp -r bench/results "$out/results" 2>/dev/null
for b in "${benches[@]}"; do echo "== $b"; tail -25 "$out/$b.log"; done
