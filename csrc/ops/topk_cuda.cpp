// CUDA glue of top-k (schema in topk.cpp): same checks and layout as the CPU, workspace from torch's caching
// allocator, kernels on the current stream. The kernels are in csrc/kernels/cuda/topk.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/cuda/topk.h"
#include "ops/topk.h"

namespace {

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& x, int64_t k, int64_t dim, bool largest,
                                             bool sorted) {
  TORCH_CHECK_VALUE(x.is_cuda(), "topk: x must be a CUDA tensor here, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  sr::ops::TopkProblem p = sr::ops::topk_prepare(x, k, dim);
  if (p.k == 0 || p.rows == 0) return sr::ops::topk_result(p);
  const auto dtype = sr::ops::topk_dtype(p.src.scalar_type());
  // Small k: one read of the row by a block-level selection; large k: the radix select (or the opt-in one-read
  // radix select wherever it fits).
  const bool one_read = sr::cuda::topk_one_read(dtype, p.rows, p.n, p.k);
  const bool small = p.k <= sr::cuda::kSmallTopk && !one_read;
  const size_t bytes = small ? sr::cuda::topk_small_workspace_bytes(p.rows, p.n, p.k)
                             : sr::cuda::topk_workspace_bytes(p.rows, p.n, p.k, sorted, one_read);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err =
      small ? sr::cuda::topk_small(p.src.data_ptr(), dtype, p.rows, p.n, p.k, largest, p.values.data_ptr(),
                                   p.indices.data_ptr<int64_t>(), workspace.data_ptr(), bytes, stream)
            : sr::cuda::topk(p.src.data_ptr(), dtype, p.rows, p.n, p.k, largest, sorted, one_read,
                             p.values.data_ptr(), p.indices.data_ptr<int64_t>(), workspace.data_ptr(), bytes,
                             stream);
  TORCH_CHECK(err == cudaSuccess, "topk: CUDA kernel failed: ", cudaGetErrorString(err));
  return sr::ops::topk_result(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_retrieval, CUDA, m) { m.impl("topk", &topk_cuda); }
