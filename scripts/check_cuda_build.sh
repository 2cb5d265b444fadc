#!/usr/bin/env bash
# Proves the CUDA build compiles and links: torch 2.14.1 (CUDA 13) in .venv-cuda, the extension built for sm_90,
# then imported to check that the CUDA kernels are registered. Nothing runs on a GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${SR_CUDA_VENV:-$root/.venv-cuda}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$py" -m pip install -q torch==2.14.1 numpy pybind11 scikit-build-core cmake ninja tqdm
rm -rf "$root/dist/cuda" "$root/build/cuda-site"
(cd "$root" && SPARSE_RETRIEVAL_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  "$py" -m pip wheel -q --no-build-isolation --no-deps -w dist/cuda . -C build-dir=build/cuda)
"$py" -m pip install -q --no-deps --target "$root/build/cuda-site" "$root"/dist/cuda/sparse_retrieval-*.whl
cd "$root/build"
PYTHONPATH="$root/build/cuda-site" "$py" - <<'PY'
import torch
import sparse_retrieval as sr

info = sr.build_info()
print(info)
assert info["cuda"], "the extension was built without CUDA"
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("sparse_retrieval::")]
cuda_ops = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print(f"{len(cuda_ops)} of {len(ops)} ops have CUDA kernels: {sorted(cuda_ops)}")
expected = {"topk", "sparse_dot", "pairwise_sparse_dot", "sparse_search", "cq_encode", "cq_decode", "cq_attention"}
missing = sorted(op for op in expected if f"sparse_retrieval::{op}" not in cuda_ops)
assert not missing, f"ops without a CUDA kernel: {missing}"
PY
