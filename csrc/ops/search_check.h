// Checks of sparse_search's inputs shared by its CPU and CUDA glue. Posting contents (offsets monotone, document ids
// in range and strictly ascending per list) are checked once per tensor version (list_check.h).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>

#include "ops/csr_check.h"
#include "ops/list_check.h"

namespace sr::ops {

// The optional document filter of the search ops: one bool or uint8 per document id (0: skip it); null when absent.
inline const uint8_t* allowed_mask(const std::optional<at::Tensor>& allowed, int64_t ndocs, c10::DeviceType device) {
  if (!allowed.has_value()) return nullptr;
  const auto& a = *allowed;
  TORCH_CHECK_TYPE(a.scalar_type() == at::kBool || a.scalar_type() == at::kByte,
                   "allowed: expected a bool or uint8 mask, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 1 && a.is_contiguous() && a.numel() == ndocs, "allowed: expected a contiguous 1-D "
                    "mask with one entry per document (", ndocs, "), got shape ", a.sizes());
  TORCH_CHECK_VALUE(a.device().type() == device, "allowed: expected a tensor on ", device, ", got ", a.device());
  return static_cast<const uint8_t*>(a.data_ptr());
}

// Returns the index's dimension (ptrs[s].numel() - 1, shared by all segments; 0 without segments).
inline int64_t check_search_inputs(const at::Tensor& q_indptr, const at::Tensor& q_indices,
                                   const at::Tensor& q_values, at::TensorList ptrs, at::TensorList docs,
                                   at::TensorList weights, at::IntArrayRef sizes, int64_t k, int64_t num_threads,
                                   c10::DeviceType device) {
  TORCH_CHECK_VALUE(k >= 0 && k <= std::numeric_limits<int32_t>::max(), "k: must lie in [0, 2^31), got ", k);
  TORCH_CHECK_VALUE(num_threads >= 0, "num_threads: must be >= 0 (0: all), got ", num_threads);
  TORCH_CHECK_VALUE(ptrs.size() == docs.size() && ptrs.size() == weights.size() && ptrs.size() == sizes.size(),
                    "ptrs, docs, weights and sizes: one entry per segment expected, got ", ptrs.size(), ", ",
                    docs.size(), ", ", weights.size(), ", ", sizes.size());
  TORCH_CHECK_VALUE(ptrs.empty() || ptrs[0].numel() >= 1, "ptrs[0]: expected dim + 1 >= 1 entries, got none");
  const int64_t dim = ptrs.empty() ? 0 : ptrs[0].numel() - 1;
  for (size_t s = 0; s < ptrs.size(); ++s) {
    const auto& p = ptrs[s];
    TORCH_CHECK_TYPE(p.scalar_type() == at::kLong && p.dim() == 1 && p.is_contiguous(), "ptrs[", s,
                     "]: expected a contiguous 1-D int64 tensor");
    TORCH_CHECK_VALUE(p.numel() == dim + 1, "ptrs[", s, "]: expected ", dim + 1, " entries like ptrs[0], got ",
                      p.numel());
    TORCH_CHECK_TYPE(docs[s].scalar_type() == at::kInt && docs[s].dim() == 1 && docs[s].is_contiguous(), "docs[", s,
                     "]: expected a contiguous 1-D int32 tensor");
    value_type(weights[s], "weights[" + std::to_string(s) + "]");
    TORCH_CHECK_VALUE(weights[s].dim() == 1 && weights[s].is_contiguous() && weights[s].numel() == docs[s].numel(),
                      "weights[", s, "]: expected a contiguous 1-D tensor as long as docs[", s, "]");
    TORCH_CHECK_VALUE(p.device().type() == device && docs[s].device().type() == device &&
                          weights[s].device().type() == device,
                      "segment ", s, ": expected tensors on ", device);
    TORCH_CHECK_VALUE(sizes[s] >= 0 && sizes[s] <= std::numeric_limits<int32_t>::max(), "sizes[", s,
                      "]: must lie in [0, 2^31), got ", sizes[s]);
    TORCH_CHECK_VALUE(p[0].item<int64_t>() == 0 && p[-1].item<int64_t>() == docs[s].numel(), "ptrs[", s,
                      "]: must run from 0 to the number of postings ", docs[s].numel());
    check_once("posting lists", {p, docs[s]}, {sizes[s]}, [&] {
      check_lists(p, docs[s], sizes[s], "ptrs[" + std::to_string(s) + "]", "docs[" + std::to_string(s) + "]");
    });
  }
  check_csr(q_indptr, q_indices, &q_values, dim, "q", device);
  return dim;
}

}  // namespace sr::ops
