// ATen-side checks of CSR tensor triples (indptr, indices, values) shared by the sparse op families: the checks
// that guard memory safety in the kernels (layout, dtypes, bounds). Python checks the rest first.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>

#include "kernels/cpu/sparse_dot.h"
#include "ops/arg_check.h"

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

// Lowers `a` to `v` if `v` is smaller, from any thread: the first of several parallel findings.
inline void lower_to(std::atomic<int64_t>& a, int64_t v) {
  for (int64_t seen = a.load(); v < seen && !a.compare_exchange_weak(seen, v);) {
  }
}

// What check_csr learns from a pass over sorted rows: the first non-zero whose column index is not above its left
// neighbour's in the same row (-1: none), and the smallest and largest index (each row's first and last, when the
// rows are sorted). CPU: one pass in parallel over rows (the dot ops run on training paths, where tensor ops here
// cost a quarter of a pairwise product); other devices: tensor ops.
struct RowOrder {
  int64_t first_bad, lo, hi;
};

inline RowOrder row_order(const at::Tensor& indptr, const at::Tensor& indices) {
  const int64_t nnz = indices.numel();
  if (!indptr.device().is_cpu()) {
    auto starts = at::zeros({nnz + 1}, indptr.options().dtype(at::kBool));
    starts.index_fill_(0, indptr, true);
    // a pair of neighbours out of order counts unless the second starts a row
    auto bad = (indices.slice(0, 1) <= indices.slice(0, 0, -1)).logical_and_(starts.slice(0, 1, nnz).logical_not());
    auto [lo, hi] = at::aminmax(indices);
    return {bad.any().item<bool>() ? bad.nonzero()[0][0].item<int64_t>() + 1 : -1, lo.item<int64_t>(),
            hi.item<int64_t>()};
  }
  const auto p_t = indptr.contiguous(), i_t = indices.contiguous();
  const int64_t* p = p_t.data_ptr<int64_t>();
  std::atomic<int64_t> first{nnz}, lo{std::numeric_limits<int64_t>::max()}, hi{std::numeric_limits<int64_t>::min()};
  const auto raise = [](std::atomic<int64_t>& a, int64_t v) {
    for (int64_t seen = a.load(); v > seen && !a.compare_exchange_weak(seen, v);) {
    }
  };
  AT_DISPATCH_INDEX_TYPES(i_t.scalar_type(), "row_order", [&] {
    const index_t* idx = i_t.data_ptr<index_t>();
    at::parallel_for(0, p_t.numel() - 1, 2048, [&](int64_t begin, int64_t end) {
      int64_t l = std::numeric_limits<int64_t>::max(), h = std::numeric_limits<int64_t>::min(), bad = -1;
      for (int64_t r = begin; r < end && bad < 0; ++r) {
        if (p[r] == p[r + 1]) continue;
        l = std::min<int64_t>(l, idx[p[r]]);
        h = std::max<int64_t>(h, idx[p[r + 1] - 1]);
        for (int64_t j = p[r] + 1; j < p[r + 1]; ++j) {
          if (idx[j] <= idx[j - 1]) {
            bad = j;  // the range's first: its rows come in order
            break;
          }
        }
      }
      if (bad >= 0) lower_to(first, bad);
      lower_to(lo, l);
      raise(hi, h);
    });
  });
  return {first.load() < nnz ? first.load() : -1, lo.load(), hi.load()};
}

// Checks indptr (int64, rows + 1, from 0 to nnz, non-decreasing), indices (int32/int64, in [0, dim); with
// `sorted`, strictly ascending within each row) and, unless null (an op without values), values (one per index).
// `device` is the expected device type.
inline void check_csr(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor* values, int64_t dim,
                      const std::string& name, c10::DeviceType device, bool sorted = false) {
  require_defined(indptr, (name + "_indptr").c_str(), indices, (name + "_indices").c_str());
  TORCH_CHECK_VALUE(dim >= 0, "dim must be >= 0, got ", dim);
  TORCH_CHECK_TYPE(indptr.scalar_type() == at::kLong, name, "_indptr: expected int64, got ", indptr.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, name,
                   "_indices: expected int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indptr.dim() == 1 && indices.dim() == 1, name, ": indptr and indices must be 1-D");
  TORCH_CHECK_VALUE(indptr.numel() >= 1, name, "_indptr: needs rows + 1 >= 1 entries");
  TORCH_CHECK_VALUE(indptr.device().type() == device && indices.device().type() == device, name,
                    ": expected tensors on ", device, ", got ", indptr.device(), " and ", indices.device());
  if (values != nullptr) {
    require_defined(*values, (name + "_values").c_str());
    value_type(*values, name + "_values");
    TORCH_CHECK_VALUE(values->dim() == 1 && values->numel() == indices.numel(), name, "_values: expected ",
                      indices.numel(), " values (one per index), got shape ", values->sizes());
    TORCH_CHECK_VALUE(values->device().type() == device, name, "_values: expected a tensor on ", device);
  }
  const int64_t nnz = indices.numel();
  TORCH_CHECK_VALUE(indptr[0].item<int64_t>() == 0 && indptr[-1].item<int64_t>() == nnz, name,
                    "_indptr: must run from 0 to the number of non-zeros ", nnz);
  if (indptr.numel() > 1) {
    TORCH_CHECK_VALUE(!(indptr.slice(0, 1) < indptr.slice(0, 0, -1)).any().item<bool>(), name,
                      "_indptr: must be non-decreasing");
  }
  if (nnz == 0) return;
  const RowOrder order = sorted ? row_order(indptr, indices) : RowOrder{-1, 0, -1};
  int64_t lo = order.lo, hi = order.hi;
  if (!sorted || order.first_bad >= 0) {  // rows out of order: their ends are not the extremes
    auto [lo_t, hi_t] = at::aminmax(indices);
    lo = lo_t.item<int64_t>();
    hi = hi_t.item<int64_t>();
  }
  // an index out of range is the error to name first
  TORCH_CHECK_INDEX(lo >= 0 && hi < dim, name, "_indices: column indices must lie in [0, ", dim, "), got [", lo, ", ",
                    hi, "]");
  if (order.first_bad >= 0) {
    const int64_t pos = order.first_bad;
    const int64_t row = at::searchsorted(indptr, pos, /*out_int32=*/false, /*right=*/true).item<int64_t>() - 1;
    const bool repeat = indices[pos].item<int64_t>() == indices[pos - 1].item<int64_t>();
    TORCH_CHECK_VALUE(false, name, "_indices: column indices ", repeat ? "repeated" : "not ascending", " within row ",
                      row, " (at non-zero ", pos, "); each row's must be strictly ascending");
  }
}

inline sr::cpu::CsrView csr_view(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values) {
  return {indptr.data_ptr<int64_t>(), indices.data_ptr(), values.defined() ? values.data_ptr() : nullptr,
          indptr.numel() - 1, indices.scalar_type() == at::kLong,
          values.defined() ? value_type(values, "values") : sr::cpu::ValueType::F32};
}

// Checks both operands (a's values unless null: the backward ops take none) and that they share index and value
// dtypes. Indices must be strictly ascending within rows: the kernels merge rows or scatter them.
inline void check_pair(const at::Tensor& a_indptr, const at::Tensor& a_indices, const at::Tensor* a_values,
                       const at::Tensor& b_indptr, const at::Tensor& b_indices, const at::Tensor& b_values, int64_t dim,
                       c10::DeviceType device) {
  check_csr(a_indptr, a_indices, a_values, dim, "a", device, /*sorted=*/true);
  check_csr(b_indptr, b_indices, &b_values, dim, "b", device, /*sorted=*/true);
  TORCH_CHECK_TYPE(a_indices.scalar_type() == b_indices.scalar_type(), "a_indices and b_indices: dtypes differ (",
                   a_indices.scalar_type(), " vs ", b_indices.scalar_type(), ")");
  if (a_values != nullptr) {
    TORCH_CHECK_TYPE(a_values->scalar_type() == b_values.scalar_type(), "a_values and b_values: dtypes differ (",
                     a_values->scalar_type(), " vs ", b_values.scalar_type(), ")");
  }
}

// The incoming gradient of a dot op must have the shape of that op's output.
inline void check_grad(const at::Tensor& grad, at::IntArrayRef expected) {
  require_defined(grad, "grad");
  TORCH_CHECK_TYPE(grad.is_floating_point(), "grad: expected a floating-point tensor, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == expected, "grad: expected shape ", expected, ", got ", grad.sizes());
}

}  // namespace sr::ops
