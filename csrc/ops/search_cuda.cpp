// CUDA glue of sparse_search (schema in search.cpp): per-chunk candidates from the kernel (search_chunk.h), merged
// per query with a stable sort (candidates are laid out in document order, so equal scores keep the lower id
// first). With SPARSE_RETRIEVAL_SEARCH_ONE_LAUNCH=1 (opt-in until it has passed on a GPU), an index of at most
// kMaxSegments segments and k <= kMaxMergeK, the kernel merges them itself: one launch per batch of queries.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "kernels/cuda/search.h"
#include "ops/search_check.h"

namespace sr::ops {
namespace {

// Candidate entries held at once (scores + ids); query batches are sized to stay below it.
constexpr int64_t kMaxCandidates = int64_t(1) << 25;

std::tuple<at::Tensor, at::Tensor> sparse_search_cuda(const at::Tensor& q_indptr, const at::Tensor& q_indices,
                                                      const at::Tensor& q_values, at::TensorList ptrs,
                                                      at::TensorList docs, at::TensorList weights,
                                                      at::IntArrayRef sizes, int64_t k, int64_t num_threads,
                                                      const std::optional<at::Tensor>& allowed) {
  using namespace sr::cuda::searchchunk;
  check_search_inputs(q_indptr, q_indices, q_values, ptrs, docs, weights, sizes, k, num_threads, c10::kCUDA);
  TORCH_CHECK_VALUE(!allowed.has_value(), "allowed: search filters run on the CPU; move the index to the CPU");
  const c10::cuda::CUDAGuard guard(q_values.device());
  const int64_t nq = q_indptr.numel() - 1;
  // Launches of at most kMaxSegments segments, their tables passed by value.
  std::vector<SegmentData> segs;
  for (size_t s = 0; s < ptrs.size(); ++s) {
    segs.push_back({ptrs[s].data_ptr<int64_t>(), docs[s].data_ptr<int32_t>(), weights[s].data_ptr(), sizes[s]});
  }
  const std::vector<Segments> launches = plan_launches(segs);
  const int64_t nchunks = launches.empty() ? 0 : launches[0].stride;
  const auto score_options = q_values.options().dtype(at::kFloat);
  if (nq == 0 || k == 0 || nchunks == 0) {
    return {at::full({nq, k}, -std::numeric_limits<float>::infinity(), score_options), at::full({nq, k}, -1,
            q_indptr.options())};
  }
  auto qp = q_indptr.contiguous();
  auto qt = q_indices.to(at::kLong).contiguous();
  auto qw = q_values.to(at::kFloat).contiguous();
  const auto wtype = value_type(weights[0], "weights");
  const int64_t kk = std::min(k, kChunk);
  const bool one_launch =
      launches.size() == 1 && k <= kMaxMergeK && sr::cuda::opted_in("SPARSE_RETRIEVAL_SEARCH_ONE_LAUNCH");
  auto out_scores = one_launch ? at::empty({nq, k}, score_options)
                               : at::full({nq, k}, -std::numeric_limits<float>::infinity(), score_options);
  auto out_ids = one_launch ? at::empty({nq, k}, q_indptr.options()) : at::full({nq, k}, -1, q_indptr.options());
  const int64_t keep = std::min(k, nchunks * kk);
  const int64_t batch = std::clamp<int64_t>(kMaxCandidates / (nchunks * kk), 1, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < nq; start += batch) {
    const int64_t nb = std::min(batch, nq - start);
    auto cand_s = at::empty({nb, nchunks * kk}, qw.options());
    auto cand_i = at::empty({nb, nchunks * kk}, qp.options());
    const Queries qs{qp.data_ptr<int64_t>() + start, qt.data_ptr<int64_t>(), qw.data_ptr<float>()};
    Output out{cand_s.data_ptr<float>(), cand_i.data_ptr<int64_t>(), kk, nullptr, nullptr, nullptr, k};
    at::Tensor done;
    if (one_launch) {
      done = at::empty({nb}, qp.options().dtype(at::kInt));
      C10_CUDA_CHECK(cudaMemsetAsync(done.data_ptr(), 0, nb * sizeof(unsigned int), stream));
      out.done = reinterpret_cast<unsigned int*>(done.data_ptr<int32_t>());
      out.scores = out_scores.data_ptr<float>() + start * k;
      out.ids = out_ids.data_ptr<int64_t>() + start * k;
    }
    for (const Segments& l : launches) C10_CUDA_CHECK(sr::cuda::search_chunks(l, nb, qs, wtype, out, stream));
    if (one_launch) continue;
    auto [sorted, order] = cand_s.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
    order = order.narrow(1, 0, keep);
    out_scores.narrow(0, start, nb).narrow(1, 0, keep).copy_(sorted.narrow(1, 0, keep));
    out_ids.narrow(0, start, nb).narrow(1, 0, keep).copy_(cand_i.gather(1, order));
  }
  return {out_scores, out_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_retrieval, CUDA, m) { m.impl("sparse_search", &sparse_search_cuda); }

}  // namespace sr::ops
