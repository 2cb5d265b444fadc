// Schema and CPU glue of the block-max pruned search (csrc/kernels/cpu/block_search.cpp). Every shape, dtype and
// offset end point is checked on each call; the contents of the offset and id arrays once per tensor version
// (list_check.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "kernels/cpu/block_search.h"
#include "kernels/cpu/simd.h"
#include "ops/csr_check.h"
#include "ops/list_check.h"
#include "ops/search_check.h"

namespace sr::ops {
namespace {

void check_1d(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.device().is_cpu(), name,
                    ": expected a contiguous 1-D CPU tensor");
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, name, ": expected ", numel, " entries, got ", t.numel());
}

void check_offsets(const at::Tensor& ptr, int64_t total, const char* name) {
  TORCH_CHECK_VALUE(ptr[0].item<int64_t>() == 0 && ptr[-1].item<int64_t>() == total, name,
                    ": must run from 0 to ", total);
}

// Checks a forward index (offsets, term and weight arrays of ndocs documents over dim terms); returns its value type.
sr::cpu::ValueType check_forward(const at::Tensor& fwd_ptr, const at::Tensor& fwd_terms, const at::Tensor& fwd_weights,
                                 int64_t dim, int64_t block_size) {
  TORCH_CHECK_VALUE(fwd_ptr.dim() == 1 && fwd_ptr.numel() >= 1, "fwd_ptr: expected ndocs + 1 >= 1 entries");
  const int64_t ndocs = fwd_ptr.numel() - 1;
  TORCH_CHECK_VALUE(ndocs <= std::numeric_limits<int32_t>::max() - block_size, "fwd_ptr: too many documents");
  check_1d(fwd_ptr, at::kLong, ndocs + 1, "fwd_ptr");
  TORCH_CHECK_TYPE(fwd_terms.scalar_type() == at::kShort || fwd_terms.scalar_type() == at::kInt,
                   "fwd_terms: expected int16 (read as uint16) or int32, got ", fwd_terms.scalar_type());
  check_1d(fwd_terms, fwd_terms.scalar_type(), -1, "fwd_terms");
  TORCH_CHECK_VALUE(fwd_terms.scalar_type() == at::kInt || dim <= 65536, "fwd_terms: int16 terms need dim <= 65536");
  check_offsets(fwd_ptr, fwd_terms.numel(), "fwd_ptr");
  const auto wtype = value_type(fwd_weights, "fwd_weights");
  check_1d(fwd_weights, fwd_weights.scalar_type(), fwd_terms.numel(), "fwd_weights");
  return wtype;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_search_cpu(
    const at::Tensor& q_indptr, const at::Tensor& q_indices, const at::Tensor& q_values, at::TensorList index,
    int64_t block_size, int64_t k, double alpha, int64_t query_cut, int64_t num_threads,
    const std::optional<at::Tensor>& allowed) {
  TORCH_CHECK_VALUE(k >= 0, "k: must be >= 0, got ", k);
  TORCH_CHECK_VALUE(alpha > 0.0 && alpha <= 1.0, "alpha: must lie in (0, 1], got ", alpha);
  TORCH_CHECK_VALUE(query_cut >= 0, "query_cut: must be >= 0 (0: every term), got ", query_cut);
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= (int64_t(1) << 20), "block_size: must lie in [1, 2^20], got ",
                    block_size);
  TORCH_CHECK_VALUE(num_threads >= 0, "num_threads: must be >= 0 (0: all), got ", num_threads);
  TORCH_CHECK_VALUE(index.size() == 10, "index: expected 10 tensors (fwd_ptr, fwd_terms, fwd_weights, doc_ids, scale, "
                    "bm_dense_row, bm_dense, bm_ptr, bm_blocks, bm_values), got ", index.size());
  const auto &fwd_ptr = index[0], &fwd_terms = index[1], &fwd_weights = index[2], &doc_ids = index[3],
             &scale = index[4], &dense_row = index[5], &bm_dense = index[6], &bm_ptr = index[7],
             &bm_blocks = index[8], &bm_values = index[9];
  TORCH_CHECK_VALUE(bm_ptr.dim() == 1 && bm_ptr.numel() >= 1, "bm_ptr: expected dim + 1 >= 1 entries");
  const int64_t dim = bm_ptr.numel() - 1;
  const auto wtype = check_forward(fwd_ptr, fwd_terms, fwd_weights, dim, block_size);
  const int64_t ndocs = fwd_ptr.numel() - 1;
  const int64_t nblocks = (ndocs + block_size - 1) / block_size;
  check_1d(doc_ids, at::kLong, ndocs, "doc_ids");
  check_1d(scale, at::kFloat, dim, "scale");
  check_1d(dense_row, at::kLong, dim, "bm_dense_row");
  check_1d(bm_dense, at::kByte, -1, "bm_dense");
  TORCH_CHECK_VALUE(nblocks == 0 ? bm_dense.numel() == 0 : bm_dense.numel() % nblocks == 0,
                    "bm_dense: expected a multiple of ", nblocks, " bytes (one row per dense term)");
  const int64_t rows = nblocks ? bm_dense.numel() / nblocks : 0;
  check_1d(bm_ptr, at::kLong, dim + 1, "bm_ptr");
  check_1d(bm_blocks, at::kInt, -1, "bm_blocks");
  check_1d(bm_values, at::kByte, bm_blocks.numel(), "bm_values");
  check_offsets(bm_ptr, bm_blocks.numel(), "bm_ptr");
  check_once("block-max index", {fwd_ptr, fwd_terms, doc_ids, dense_row, bm_ptr, bm_blocks}, {dim, block_size, rows},
             [&] {
    check_lists(fwd_ptr, fwd_terms, dim, "fwd_ptr", "fwd_terms");
    check_lists(bm_ptr, bm_blocks, nblocks, "bm_ptr", "bm_blocks");
    if (ndocs > 0) {
      auto [lo, hi] = at::aminmax(doc_ids);
      TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < ndocs, "doc_ids: ids must lie in [0, ",
                        ndocs, ")");
    }
    if (dim > 0) {
      auto [lo, hi] = at::aminmax(dense_row);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < rows, "bm_dense_row: rows must lie in [-1, ",
                        rows, ")");
    }
  });
  check_csr(q_indptr, q_indices, q_values, dim, "q", c10::kCPU);
  const uint8_t* mask = allowed_mask(allowed, ndocs, c10::kCPU);

  const int64_t nq = q_indptr.numel() - 1;
  auto out_scores = at::full({nq, k}, -std::numeric_limits<float>::infinity(), q_values.options().dtype(at::kFloat));
  auto out_ids = at::full({nq, k}, -1, q_indptr.options());
  auto complete = at::zeros({nq}, q_indptr.options().dtype(at::kBool));
  auto visited = at::zeros({nq}, q_indptr.options());
  if (nq == 0 || k == 0 || ndocs == 0) return {out_scores, out_ids, complete, visited};

  const sr::cpu::BlockMaxIndex ix{ndocs, dim, block_size, nblocks, fwd_terms.numel(), rows, bm_blocks.numel(),
                                  fwd_ptr.data_ptr<int64_t>(),
                                  fwd_terms.data_ptr(), fwd_terms.scalar_type() == at::kShort,
                                  fwd_weights.data_ptr(), wtype, doc_ids.data_ptr<int64_t>(),
                                  scale.data_ptr<float>(), dense_row.data_ptr<int64_t>(), bm_dense.data_ptr<uint8_t>(),
                                  bm_ptr.data_ptr<int64_t>(), bm_blocks.data_ptr<int32_t>(),
                                  bm_values.data_ptr<uint8_t>()};
  auto qp = q_indptr.contiguous();
  auto qt = q_indices.to(at::kLong).contiguous();
  auto qw = q_values.to(at::kFloat).contiguous();
  const int64_t* qptr = qp.data_ptr<int64_t>();
  float* os = out_scores.data_ptr<float>();
  int64_t* oi = out_ids.data_ptr<int64_t>();
  bool* oc = complete.data_ptr<bool>();
  int64_t* ov = visited.data_ptr<int64_t>();
  const int64_t threads = std::min(num_threads > 0 ? num_threads : int64_t(at::get_num_threads()), nq);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<uint8_t> slot(std::max<int64_t>(dim + 1, 65536), 0);
    std::vector<float> qslot(256), ub(nblocks);
    std::vector<int32_t> order(nblocks);
    const sr::cpu::BlockScratch scratch{slot.data(), qslot.data(), ub.data(), order.data()};
    for (int64_t i = next++; i < nq; i = next++) {
      const sr::cpu::SearchQuery query{qt.data_ptr<int64_t>() + qptr[i], qw.data_ptr<float>() + qptr[i],
                                       qptr[i + 1] - qptr[i]};
      oc[i] = SR_SIMD_DISPATCH(block_search_query, ix, query, k, float(alpha), query_cut, mask, scratch, os + i * k,
                               oi + i * k,
                               ov + i);
    }
  });
  TORCH_CHECK_VALUE(!(visited < 0).any().item<bool>(), "block_search: the index changed after it was checked "
                    "(written behind torch's back, e.g. through a numpy view or a memory-mapped file): offsets or "
                    "ids are invalid");
  return {out_scores, out_ids, complete, visited};
}

// The block maxima of a forward index (see block_maxima in the kernel header): (scale, dense_row, dense, ptr,
// blocks, values). Checks everything it reads: it runs once per build.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_maxima_cpu(
    const at::Tensor& fwd_ptr, const at::Tensor& fwd_terms, const at::Tensor& fwd_weights, int64_t dim,
    int64_t block_size, double dense_fraction) {
  TORCH_CHECK_VALUE(dim >= 1 && dim < (int64_t(1) << 40), "dim: must lie in [1, 2^40), got ", dim);
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= (int64_t(1) << 20), "block_size: must lie in [1, 2^20], got ",
                    block_size);
  TORCH_CHECK_VALUE(dense_fraction > 0.0 && dense_fraction <= 1.0, "dense_fraction: must lie in (0, 1], got ",
                    dense_fraction);
  const auto wtype = check_forward(fwd_ptr, fwd_terms, fwd_weights, dim, block_size);
  const int64_t ndocs = fwd_ptr.numel() - 1;
  check_lists(fwd_ptr, fwd_terms, dim, "fwd_ptr", "fwd_terms");
  if (fwd_terms.numel() > 0) {
    const auto w = fwd_weights.to(at::kFloat);
    TORCH_CHECK_VALUE(w.ge(0).logical_and(w.isfinite()).all().item<bool>(),
                      "fwd_weights: must be finite and non-negative");
  }
  const int64_t nblocks = (ndocs + block_size - 1) / block_size;
  const int64_t min_dense = std::max<int64_t>(1, int64_t(std::ceil(dense_fraction * double(nblocks))));
  auto scale = at::empty({dim}, fwd_ptr.options().dtype(at::kFloat));
  auto dense_row = at::empty({dim}, fwd_ptr.options());
  auto ptr = at::empty({dim + 1}, fwd_ptr.options());
  const bool t16 = fwd_terms.scalar_type() == at::kShort;
  const int64_t rows = SR_SIMD_DISPATCH(block_maxima, fwd_ptr.data_ptr<int64_t>(), fwd_terms.data_ptr(), t16,
                                        fwd_weights.data_ptr(), wtype, ndocs, dim, block_size, min_dense,
                                        scale.data_ptr<float>(), dense_row.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(),
                                        nullptr, nullptr, nullptr);
  const int64_t entries = ptr[-1].item<int64_t>();
  auto dense = at::zeros({rows * nblocks}, fwd_ptr.options().dtype(at::kByte));
  auto blocks = at::empty({entries}, fwd_ptr.options().dtype(at::kInt));
  auto values = at::empty({entries}, fwd_ptr.options().dtype(at::kByte));
  SR_SIMD_DISPATCH(block_maxima, fwd_ptr.data_ptr<int64_t>(), fwd_terms.data_ptr(), t16, fwd_weights.data_ptr(),
                   wtype, ndocs, dim, block_size, min_dense, scale.data_ptr<float>(), dense_row.data_ptr<int64_t>(),
                   ptr.data_ptr<int64_t>(), dense.data_ptr<uint8_t>(), blocks.data_ptr<int32_t>(),
                   values.data_ptr<uint8_t>());
  return {scale, dense_row, dense, ptr, blocks, values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_retrieval, m) {
  m.def("block_search(Tensor q_indptr, Tensor q_indices, Tensor q_values, Tensor[] index, int block_size, int k, "
        "float alpha, int query_cut, int num_threads, Tensor? allowed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("block_maxima(Tensor fwd_ptr, Tensor fwd_terms, Tensor fwd_weights, int dim, int block_size, "
        "float dense_fraction) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparse_retrieval, CPU, m) {
  m.impl("block_search", &block_search_cpu);
  m.impl("block_maxima", &block_maxima_cpu);
}

}  // namespace sr::ops
