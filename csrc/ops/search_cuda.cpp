// CUDA glue of sparse_search (schema in search.cpp): per-chunk candidates from the kernel, merged per query with a
// stable sort (candidates are laid out in document order, so equal scores keep the lower id first).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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
  check_search_inputs(q_indptr, q_indices, q_values, ptrs, docs, weights, sizes, k, c10::kCUDA);
  TORCH_CHECK_VALUE(!allowed.has_value(), "allowed: search filters run on the CPU; move the index to the CPU");
  const c10::cuda::CUDAGuard guard(q_values.device());
  const int64_t nq = q_indptr.numel() - 1;
  auto out_scores = at::full({nq, k}, -std::numeric_limits<float>::infinity(), q_values.options().dtype(at::kFloat));
  auto out_ids = at::full({nq, k}, -1, q_indptr.options());
  std::vector<sr::cuda::DevSegment> segs;
  std::vector<int64_t> chunks;
  int64_t base = 0;
  for (size_t s = 0; s < ptrs.size(); ++s) {
    segs.push_back({ptrs[s].data_ptr<int64_t>(), docs[s].data_ptr<int32_t>(), weights[s].data_ptr()});
    for (int64_t lo = 0; lo < sizes[s]; lo += sr::cuda::kSearchChunk) {
      const int64_t hi = std::min(sizes[s], lo + sr::cuda::kSearchChunk);
      chunks.insert(chunks.end(), {int64_t(s), lo, hi, base + lo});
    }
    base += sizes[s];
  }
  const int64_t nchunks = int64_t(chunks.size() / 4);
  if (nq == 0 || k == 0 || nchunks == 0) return {out_scores, out_ids};

  auto dev = q_values.device();
  auto seg_bytes = at::empty({int64_t(segs.size() * sizeof(sr::cuda::DevSegment))}, at::kByte);
  std::memcpy(seg_bytes.data_ptr(), segs.data(), segs.size() * sizeof(sr::cuda::DevSegment));
  seg_bytes = seg_bytes.to(dev);
  auto chunk_table = at::tensor(chunks, at::kLong).to(dev);
  auto qp = q_indptr.contiguous();
  auto qt = q_indices.to(at::kLong).contiguous();
  auto qw = q_values.to(at::kFloat).contiguous();
  const int64_t kk = std::min(k, sr::cuda::kSearchChunk);
  const int64_t keep = std::min(k, nchunks * kk);
  const int64_t batch = std::clamp<int64_t>(kMaxCandidates / (nchunks * kk), 1, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < nq; start += batch) {
    const int64_t nb = std::min(batch, nq - start);
    auto cand_s = at::empty({nb, nchunks * kk}, qw.options());
    auto cand_i = at::empty({nb, nchunks * kk}, qp.options());
    sr::cuda::search_chunks(reinterpret_cast<const sr::cuda::DevSegment*>(seg_bytes.data_ptr()),
                            chunk_table.data_ptr<int64_t>(), nchunks, nb, qp.data_ptr<int64_t>() + start,
                            qt.data_ptr<int64_t>(), qw.data_ptr<float>(), kk, value_type(weights[0], "weights"),
                            cand_s.data_ptr<float>(), cand_i.data_ptr<int64_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
