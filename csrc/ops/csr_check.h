// ATen-side checks of CSR tensor triples (indptr, indices, values) shared by the sparse op families: the checks
// that guard memory safety in the kernels (layout, dtypes, bounds). Python checks the rest first.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "kernels/cpu/sparse_dot.h"

namespace sr::ops {

inline sr::cpu::ValueType value_type(const at::Tensor& values, const std::string& name) {
  switch (values.scalar_type()) {
    case at::kFloat: return sr::cpu::ValueType::F32;
    case at::kHalf: return sr::cpu::ValueType::F16;
    case at::kBFloat16: return sr::cpu::ValueType::BF16;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected float32, float16 or bfloat16 values, got ", values.scalar_type());
  }
}

// Checks indptr (int64, rows + 1, from 0 to nnz, non-decreasing) and indices (int32/int64, in [0, dim)) and,
// when defined, values (same length). `device` is the expected device type.
inline void check_csr(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values, int64_t dim,
                      const std::string& name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(dim >= 0, "dim must be >= 0, got ", dim);
  TORCH_CHECK_TYPE(indptr.scalar_type() == at::kLong, name, "_indptr: expected int64, got ", indptr.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, name,
                   "_indices: expected int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indptr.dim() == 1 && indices.dim() == 1, name, ": indptr and indices must be 1-D");
  TORCH_CHECK_VALUE(indptr.numel() >= 1, name, "_indptr: needs rows + 1 >= 1 entries");
  TORCH_CHECK_VALUE(indptr.device().type() == device && indices.device().type() == device, name,
                    ": expected tensors on ", device, ", got ", indptr.device(), " and ", indices.device());
  if (values.defined()) {
    value_type(values, name + "_values");
    TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == indices.numel(), name, "_values: expected ",
                      indices.numel(), " values (one per index), got shape ", values.sizes());
    TORCH_CHECK_VALUE(values.device().type() == device, name, "_values: expected a tensor on ", device);
  }
  const int64_t nnz = indices.numel();
  TORCH_CHECK_VALUE(indptr[0].item<int64_t>() == 0 && indptr[-1].item<int64_t>() == nnz, name,
                    "_indptr: must run from 0 to the number of non-zeros ", nnz);
  if (indptr.numel() > 1) {
    TORCH_CHECK_VALUE(!(indptr.slice(0, 1) < indptr.slice(0, 0, -1)).any().item<bool>(), name,
                      "_indptr: must be non-decreasing");
  }
  if (nnz > 0) {
    auto [lo_t, hi_t] = at::aminmax(indices);
    const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < dim, name, "_indices: column indices must lie in [0, ", dim, "), got [", lo,
                      ", ", hi, "]");
  }
}

inline sr::cpu::CsrView csr_view(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values) {
  return {indptr.data_ptr<int64_t>(), indices.data_ptr(), values.defined() ? values.data_ptr() : nullptr,
          indptr.numel() - 1, indices.scalar_type() == at::kLong,
          values.defined() ? value_type(values, "values") : sr::cpu::ValueType::F32};
}

// Checks both operands (b's values always, a's when defined) and that they share index and value dtypes.
inline void check_pair(const at::Tensor& a_indptr, const at::Tensor& a_indices, const at::Tensor& a_values,
                       const at::Tensor& b_indptr, const at::Tensor& b_indices, const at::Tensor& b_values, int64_t dim,
                       c10::DeviceType device) {
  check_csr(a_indptr, a_indices, a_values, dim, "a", device);
  check_csr(b_indptr, b_indices, b_values, dim, "b", device);
  TORCH_CHECK_TYPE(a_indices.scalar_type() == b_indices.scalar_type(), "a_indices and b_indices: dtypes differ (",
                   a_indices.scalar_type(), " vs ", b_indices.scalar_type(), ")");
  TORCH_CHECK_TYPE(!a_values.defined() || a_values.scalar_type() == b_values.scalar_type(),
                   "a_values and b_values: dtypes differ (", a_values.scalar_type(), " vs ",
                   b_values.scalar_type(), ")");
}

// The incoming gradient of a dot op must have the shape of that op's output.
inline void check_grad(const at::Tensor& grad, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(grad.sizes() == expected, "grad: expected shape ", expected, ", got ", grad.sizes());
}

}  // namespace sr::ops
