// Schemas and CPU glue of the sparse x sparse dot products: all pairs (sparse_dot) and row with row
// (pairwise_sparse_dot), with their gradients with respect to the values of the first operand.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kernels/cpu/simd.h"
#include "kernels/cpu/sparse_dot.h"
#include "ops/csr_check.h"

namespace sr::ops {
namespace {

at::Tensor sparse_dot_cpu(const at::Tensor& a_indptr, const at::Tensor& a_indices, const at::Tensor& a_values,
                          const at::Tensor& b_indptr, const at::Tensor& b_indices, const at::Tensor& b_values,
                          int64_t dim) {
  check_pair(a_indptr, a_indices, &a_values, b_indptr, b_indices, b_values, dim, c10::kCPU);
  auto ap = a_indptr.contiguous(), ai = a_indices.contiguous(), av = a_values.contiguous();
  auto bp = b_indptr.contiguous(), bi = b_indices.contiguous(), bv = b_values.contiguous();
  const auto a = csr_view(ap, ai, av), b = csr_view(bp, bi, bv);
  auto out = at::empty({a.rows, b.rows}, ap.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const bool dense = dim <= sr::cpu::kDenseScratchMaxDim;
  at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dense ? dim : 0, 0.0f);
    SR_SIMD_DISPATCH(sparse_dot_rows, a, b, begin, end, o + begin * b.rows, dense ? scratch.data() : nullptr);
  });
  return out;
}

at::Tensor sparse_dot_backward_cpu(const at::Tensor& grad, const at::Tensor& a_indptr, const at::Tensor& a_indices,
                                   const at::Tensor& b_indptr, const at::Tensor& b_indices,
                                   const at::Tensor& b_values, int64_t dim) {
  check_pair(a_indptr, a_indices, nullptr, b_indptr, b_indices, b_values, dim, c10::kCPU);
  const int64_t na = a_indptr.numel() - 1, nb = b_indptr.numel() - 1;
  check_grad(grad, {na, nb});
  auto g = grad.to(at::kFloat).contiguous();
  auto ap = a_indptr.contiguous(), ai = a_indices.contiguous();
  auto bp = b_indptr.contiguous(), bi = b_indices.contiguous(), bv = b_values.contiguous();
  const auto a = csr_view(ap, ai, at::Tensor()), b = csr_view(bp, bi, bv);
  auto out = at::empty({ai.numel()}, ap.options().dtype(at::kFloat));
  const bool dense = dim <= sr::cpu::kDenseScratchMaxDim;
  at::parallel_for(0, na, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dense ? dim : 0, 0.0f);
    SR_SIMD_DISPATCH(sparse_dot_grad_rows, a, b, g.data_ptr<float>(), begin, end, out.data_ptr<float>(),
                     dense ? scratch.data() : nullptr);
  });
  return out;
}

at::Tensor pairwise_sparse_dot_cpu(const at::Tensor& a_indptr, const at::Tensor& a_indices,
                                   const at::Tensor& a_values, const at::Tensor& b_indptr,
                                   const at::Tensor& b_indices, const at::Tensor& b_values, int64_t dim) {
  check_pair(a_indptr, a_indices, &a_values, b_indptr, b_indices, b_values, dim, c10::kCPU);
  TORCH_CHECK_VALUE(a_indptr.numel() == b_indptr.numel(), "a and b: row counts differ (", a_indptr.numel() - 1,
                    " vs ", b_indptr.numel() - 1, ")");
  auto ap = a_indptr.contiguous(), ai = a_indices.contiguous(), av = a_values.contiguous();
  auto bp = b_indptr.contiguous(), bi = b_indices.contiguous(), bv = b_values.contiguous();
  const auto a = csr_view(ap, ai, av), b = csr_view(bp, bi, bv);
  auto out = at::empty({a.rows}, ap.options().dtype(at::kFloat));
  at::parallel_for(0, a.rows, 256, [&](int64_t begin, int64_t end) {
    SR_SIMD_DISPATCH(pairwise_dot_rows, a, b, begin, end, out.data_ptr<float>());
  });
  return out;
}

at::Tensor pairwise_sparse_dot_backward_cpu(const at::Tensor& grad, const at::Tensor& a_indptr,
                                            const at::Tensor& a_indices, const at::Tensor& b_indptr,
                                            const at::Tensor& b_indices, const at::Tensor& b_values, int64_t dim) {
  check_pair(a_indptr, a_indices, nullptr, b_indptr, b_indices, b_values, dim, c10::kCPU);
  const int64_t n = a_indptr.numel() - 1;
  TORCH_CHECK_VALUE(b_indptr.numel() == n + 1, "a and b: row counts differ");
  check_grad(grad, {n});
  auto g = grad.to(at::kFloat).contiguous();
  auto ap = a_indptr.contiguous(), ai = a_indices.contiguous();
  auto bp = b_indptr.contiguous(), bi = b_indices.contiguous(), bv = b_values.contiguous();
  const auto a = csr_view(ap, ai, at::Tensor()), b = csr_view(bp, bi, bv);
  auto out = at::empty({ai.numel()}, ap.options().dtype(at::kFloat));
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    SR_SIMD_DISPATCH(pairwise_dot_grad_rows, a, b, g.data_ptr<float>(), begin, end, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_retrieval, m) {
  m.def("sparse_dot(Tensor a_indptr, Tensor a_indices, Tensor a_values, Tensor b_indptr, Tensor b_indices, "
        "Tensor b_values, int dim) -> Tensor");
  m.def("sparse_dot_backward(Tensor grad, Tensor a_indptr, Tensor a_indices, Tensor b_indptr, Tensor b_indices, "
        "Tensor b_values, int dim) -> Tensor");
  m.def("pairwise_sparse_dot(Tensor a_indptr, Tensor a_indices, Tensor a_values, Tensor b_indptr, "
        "Tensor b_indices, Tensor b_values, int dim) -> Tensor");
  m.def("pairwise_sparse_dot_backward(Tensor grad, Tensor a_indptr, Tensor a_indices, Tensor b_indptr, "
        "Tensor b_indices, Tensor b_values, int dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_retrieval, CPU, m) {
  m.impl("sparse_dot", &sparse_dot_cpu);
  m.impl("sparse_dot_backward", &sparse_dot_backward_cpu);
  m.impl("pairwise_sparse_dot", &pairwise_sparse_dot_cpu);
  m.impl("pairwise_sparse_dot_backward", &pairwise_sparse_dot_backward_cpu);
}

}  // namespace sr::ops
