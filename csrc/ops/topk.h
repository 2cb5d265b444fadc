// Checks and layout shared by the CPU and CUDA glue of top-k: the selected dimension is moved last and made
// contiguous, so kernels see `rows` contiguous rows of length `n` and write (rows, k) outputs.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kernels/cpu/topk.h"
#include "ops/arg_check.h"

namespace sr::ops {

struct TopkProblem {
  at::Tensor src;      // (..., n) contiguous
  at::Tensor values;   // (..., k) contiguous, x's dtype
  at::Tensor indices;  // (..., k) contiguous, int64
  int64_t rows = 0, n = 0, k = 0, dim = 0;
  bool scalar_input = false;
};

inline sr::cpu::TopkDtype topk_dtype(at::ScalarType st) {
  using sr::cpu::TopkDtype;
  return st == at::kHalf ? TopkDtype::Float16 : st == at::kBFloat16 ? TopkDtype::BFloat16 : TopkDtype::Float32;
}

inline TopkProblem topk_prepare(const at::Tensor& x, int64_t k, int64_t dim) {
  require_defined(x, "x");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "topk: x must be float32, float16 or bfloat16, got ", st);
  const int64_t ndim = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK_INDEX(dim >= -ndim && dim < ndim, "topk: dim ", dim, " is out of range for a tensor with ", x.dim(),
                    " dimensions");
  TopkProblem p;
  p.dim = dim < 0 ? dim + ndim : dim;
  p.scalar_input = x.dim() == 0;
  const at::Tensor xt = p.scalar_input ? x.reshape({1}) : x;
  p.n = xt.size(p.dim);
  TORCH_CHECK_VALUE(k >= 0 && k <= p.n, "topk: k must lie in [0, ", p.n, "] (the size of dim ", dim, "), got ", k);
  TORCH_CHECK_VALUE(p.n < (int64_t{1} << 32), "topk: rows longer than 2^32 - 1 elements are not supported, got ",
                    p.n);
  p.k = k;
  p.src = (p.dim == xt.dim() - 1 ? xt : xt.movedim(p.dim, -1)).contiguous();
  p.rows = p.n > 0 ? p.src.numel() / p.n : 0;
  auto shape = p.src.sizes().vec();
  shape.back() = k;
  p.values = at::empty(shape, p.src.options());
  p.indices = at::empty(shape, p.src.options().dtype(at::kLong));
  return p;
}

// Puts the outputs back in x's layout: the selected dimension where it was, contiguous.
inline std::tuple<at::Tensor, at::Tensor> topk_result(const TopkProblem& p) {
  if (p.scalar_input && p.k == 1) return {p.values.reshape({}), p.indices.reshape({})};
  const int64_t last = p.values.dim() - 1;
  if (p.dim == last) return {p.values, p.indices};
  return {p.values.movedim(last, p.dim).contiguous(), p.indices.movedim(last, p.dim).contiguous()};
}

}  // namespace sr::ops
