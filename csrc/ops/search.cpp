// Schemas and CPU glue of the inverted index: building posting lists and the fused exact top-k search.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "kernels/cpu/search.h"
#include "kernels/cpu/simd.h"
#include "ops/csr_check.h"
#include "ops/search_check.h"

namespace sr::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_postings_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                                                                  const at::Tensor& values, int64_t dim) {
  check_csr(indptr, indices, &values, dim, "docs", c10::kCPU, /*sorted=*/true);
  TORCH_CHECK_VALUE(indptr.numel() - 1 <= std::numeric_limits<int32_t>::max(),
                    "docs: at most 2^31 - 1 documents per posting segment, got ", indptr.numel() - 1);
  auto p = indptr.contiguous(), i = indices.contiguous(), v = values.contiguous();
  auto ptr = at::empty({dim + 1}, p.options());
  auto docs = at::empty({i.numel()}, p.options().dtype(at::kInt));
  auto weights = at::empty({i.numel()}, v.options());
  SR_SIMD_DISPATCH(build_postings, csr_view(p, i, v), dim, ptr.data_ptr<int64_t>(), docs.data_ptr<int32_t>(),
                   weights.data_ptr());
  return {ptr, docs, weights};
}

std::tuple<at::Tensor, at::Tensor> sparse_search_cpu(const at::Tensor& q_indptr, const at::Tensor& q_indices,
                                                     const at::Tensor& q_values, at::TensorList ptrs,
                                                     at::TensorList docs, at::TensorList weights,
                                                     at::IntArrayRef sizes, int64_t k, int64_t num_threads,
                                                     const std::optional<at::Tensor>& allowed) {
  check_search_inputs(q_indptr, q_indices, q_values, ptrs, docs, weights, sizes, k, num_threads, c10::kCPU);
  const int64_t nq = q_indptr.numel() - 1;
  auto out_scores = at::full({nq, k}, -std::numeric_limits<float>::infinity(), q_values.options().dtype(at::kFloat));
  auto out_ids = at::full({nq, k}, -1, q_indptr.options());
  int64_t ndocs = 0;
  std::vector<sr::cpu::PostingSegment> segs;
  for (size_t s = 0; s < ptrs.size(); ++s) {
    if (sizes[s] == 0) continue;
    segs.push_back({ptrs[s].data_ptr<int64_t>(), docs[s].data_ptr<int32_t>(), weights[s].data_ptr(),
                    docs[s].numel(), sizes[s], ndocs, value_type(weights[s], "weights")});
    ndocs += sizes[s];
  }
  const uint8_t* mask = allowed_mask(allowed, ndocs, c10::kCPU);
  if (nq == 0 || k == 0 || ndocs == 0) return {out_scores, out_ids};

  auto qp = q_indptr.contiguous();
  auto qt = q_indices.to(at::kLong).contiguous();
  auto qw = q_values.to(at::kFloat).contiguous();
  const int64_t* qptr = qp.data_ptr<int64_t>();
  const int64_t max_terms = qptr[nq] == 0 ? 0 : (qp.slice(0, 1) - qp.slice(0, 0, -1)).max().item<int64_t>();

  // Clamped: more threads than this only adds splitting overhead, and the chunk count below must not overflow.
  const int64_t threads = std::min<int64_t>(num_threads > 0 ? num_threads : at::get_num_threads(), 1 << 16);
  // Few queries for many threads: each query's documents are split into ranges searched in parallel and merged.
  constexpr int64_t kMinRange = 32768;  // documents per range at least, so that a range outweighs its merge
  const int64_t chunks = nq >= threads ? 1 : std::min((threads + nq - 1) / nq, (ndocs + kMinRange - 1) / kMinRange);
  const int64_t ntasks = nq * chunks;
  const int64_t slots = std::min(k, ndocs);
  std::vector<float> cand_scores(chunks > 1 ? ntasks * slots : 0);
  std::vector<int64_t> cand_ids(cand_scores.size());
  std::vector<int64_t> cand_count(chunks > 1 ? ntasks : 0);
  float* os = out_scores.data_ptr<float>();
  int64_t* oi = out_ids.data_ptr<int64_t>();

  std::atomic<int64_t> next{0};
  std::atomic<bool> malformed{false};
  auto worker = [&](int64_t, int64_t) {
    // Not value-initialised: a single query over a small index should not pay for clearing a whole block.
    std::unique_ptr<float[]> acc(new float[std::min(sr::cpu::kSearchBlock, ndocs)]);
    std::vector<int64_t> cursor(2 * max_terms);
    for (int64_t task = next++; task < ntasks; task = next++) {
      const int64_t qi = task / chunks, c = task % chunks;
      const sr::cpu::SearchQuery q{qt.data_ptr<int64_t>() + qptr[qi], qw.data_ptr<float>() + qptr[qi],
                                   qptr[qi + 1] - qptr[qi]};
      const int64_t lo = ndocs * c / chunks, hi = ndocs * (c + 1) / chunks;
      const int64_t found = SR_SIMD_DISPATCH(
          search_range, segs.data(), int64_t(segs.size()), q, lo, hi, k, mask, acc.get(), cursor.data(),
          chunks == 1 ? os + qi * k : cand_scores.data() + task * slots,
          chunks == 1 ? oi + qi * k : cand_ids.data() + task * slots);
      if (found < 0) malformed = true;
      if (chunks > 1) cand_count[task] = std::max<int64_t>(found, 0);
    }
  };
  at::parallel_for(0, std::min(threads, ntasks), 1, worker);
  TORCH_CHECK_VALUE(!malformed, "sparse_search: a posting list changed after it was checked (written behind torch's "
                    "back, e.g. through a numpy view or a memory-mapped file): offsets or document ids are invalid");

  if (chunks > 1) {
    for (int64_t qi = 0; qi < nq; ++qi) {
      // Gather this query's candidates contiguously (ranges may have returned fewer than `slots`).
      std::vector<float> s;
      std::vector<int64_t> id;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = qi * chunks + c;
        s.insert(s.end(), cand_scores.begin() + t * slots, cand_scores.begin() + t * slots + cand_count[t]);
        id.insert(id.end(), cand_ids.begin() + t * slots, cand_ids.begin() + t * slots + cand_count[t]);
      }
      SR_SIMD_DISPATCH(merge_top, s.data(), id.data(), int64_t(s.size()), k, os + qi * k, oi + qi * k);
    }
  }
  return {out_scores, out_ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_retrieval, m) {
  m.def("build_postings(Tensor indptr, Tensor indices, Tensor values, int dim) -> (Tensor, Tensor, Tensor)");
  m.def("sparse_search(Tensor q_indptr, Tensor q_indices, Tensor q_values, Tensor[] ptrs, Tensor[] docs, "
        "Tensor[] weights, int[] sizes, int k, int num_threads, Tensor? allowed=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparse_retrieval, CPU, m) {
  m.impl("build_postings", &build_postings_cpu);
  m.impl("sparse_search", &sparse_search_cpu);
}

}  // namespace sr::ops
