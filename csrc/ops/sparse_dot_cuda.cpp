// CUDA glue of the sparse x sparse dot products (schemas in sparse_dot.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "kernels/cuda/sparse_dot.h"
#include "ops/csr_check.h"

namespace sr::ops {
namespace {

struct Operands {
  at::Tensor ap, ai, av, bp, bi, bv;
};

Operands contiguous(const at::Tensor& ap, const at::Tensor& ai, const at::Tensor& av, const at::Tensor& bp,
                    const at::Tensor& bi, const at::Tensor& bv) {
  return {ap.contiguous(), ai.contiguous(), av.defined() ? av.contiguous() : av, bp.contiguous(), bi.contiguous(),
          bv.contiguous()};
}

at::Tensor sparse_dot_cuda(const at::Tensor& a_indptr, const at::Tensor& a_indices, const at::Tensor& a_values,
                           const at::Tensor& b_indptr, const at::Tensor& b_indices, const at::Tensor& b_values,
                           int64_t dim) {
  check_pair(a_indptr, a_indices, &a_values, b_indptr, b_indices, b_values, dim, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(a_values.device());
  auto t = contiguous(a_indptr, a_indices, a_values, b_indptr, b_indices, b_values);
  auto out = at::empty({t.ap.numel() - 1, t.bp.numel() - 1}, t.av.options().dtype(at::kFloat));
  sr::cuda::sparse_dot(csr_view(t.ap, t.ai, t.av), csr_view(t.bp, t.bi, t.bv), out.data_ptr<float>(),
                       c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparse_dot_backward_cuda(const at::Tensor& grad, const at::Tensor& a_indptr, const at::Tensor& a_indices,
                                    const at::Tensor& b_indptr, const at::Tensor& b_indices,
                                    const at::Tensor& b_values, int64_t dim) {
  check_pair(a_indptr, a_indices, nullptr, b_indptr, b_indices, b_values, dim, c10::kCUDA);
  const int64_t na = a_indptr.numel() - 1, nb = b_indptr.numel() - 1;
  check_grad(grad, {na, nb});
  const c10::cuda::CUDAGuard guard(b_values.device());
  auto g = grad.to(at::kFloat).contiguous();
  auto t = contiguous(a_indptr, a_indices, at::Tensor(), b_indptr, b_indices, b_values);
  auto out = at::empty({t.ai.numel()}, t.bv.options().dtype(at::kFloat));
  sr::cuda::sparse_dot_grad(csr_view(t.ap, t.ai, at::Tensor()), t.ai.numel(), csr_view(t.bp, t.bi, t.bv),
                            g.data_ptr<float>(), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pairwise_sparse_dot_cuda(const at::Tensor& a_indptr, const at::Tensor& a_indices,
                                    const at::Tensor& a_values, const at::Tensor& b_indptr,
                                    const at::Tensor& b_indices, const at::Tensor& b_values, int64_t dim) {
  check_pair(a_indptr, a_indices, &a_values, b_indptr, b_indices, b_values, dim, c10::kCUDA);
  TORCH_CHECK_VALUE(a_indptr.numel() == b_indptr.numel(), "a and b: row counts differ (", a_indptr.numel() - 1,
                    " vs ", b_indptr.numel() - 1, ")");
  const c10::cuda::CUDAGuard guard(a_values.device());
  auto t = contiguous(a_indptr, a_indices, a_values, b_indptr, b_indices, b_values);
  auto out = at::empty({t.ap.numel() - 1}, t.av.options().dtype(at::kFloat));
  sr::cuda::pairwise_dot(csr_view(t.ap, t.ai, t.av), csr_view(t.bp, t.bi, t.bv), out.data_ptr<float>(),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pairwise_sparse_dot_backward_cuda(const at::Tensor& grad, const at::Tensor& a_indptr,
                                             const at::Tensor& a_indices, const at::Tensor& b_indptr,
                                             const at::Tensor& b_indices, const at::Tensor& b_values, int64_t dim) {
  check_pair(a_indptr, a_indices, nullptr, b_indptr, b_indices, b_values, dim, c10::kCUDA);
  const int64_t n = a_indptr.numel() - 1;
  TORCH_CHECK_VALUE(b_indptr.numel() == n + 1, "a and b: row counts differ");
  check_grad(grad, {n});
  const c10::cuda::CUDAGuard guard(b_values.device());
  auto g = grad.to(at::kFloat).contiguous();
  auto t = contiguous(a_indptr, a_indices, at::Tensor(), b_indptr, b_indices, b_values);
  auto out = at::empty({t.ai.numel()}, t.bv.options().dtype(at::kFloat));
  sr::cuda::pairwise_dot_grad(csr_view(t.ap, t.ai, at::Tensor()), t.ai.numel(), csr_view(t.bp, t.bi, t.bv),
                              g.data_ptr<float>(), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_retrieval, CUDA, m) {
  m.impl("sparse_dot", &sparse_dot_cuda);
  m.impl("sparse_dot_backward", &sparse_dot_backward_cuda);
  m.impl("pairwise_sparse_dot", &pairwise_sparse_dot_cuda);
  m.impl("pairwise_sparse_dot_backward", &pairwise_sparse_dot_backward_cuda);
}

}  // namespace sr::ops
