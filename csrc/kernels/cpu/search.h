// Exact top-k search over an inverted index (torch-free): term-at-a-time accumulation of a query's posting lists
// into a block of per-document accumulators, fused with the search's own top-k selection over each block.
#pragma once

#include <cstdint>

#include "kernels/cpu/simd.h"
#include "kernels/cpu/sparse_dot.h"

namespace sr::cpu {

// Postings of documents [base, base + ndocs): for dimension t, entries [ptr[t], ptr[t + 1]) of the nnz hold local
// document ids (increasing) and weights of `wtype`.
struct PostingSegment {
  const int64_t* ptr;
  const int32_t* docs;
  const void* weights;
  int64_t nnz;
  int64_t ndocs;
  int64_t base;
  ValueType wtype;
};

struct SearchQuery {
  const int64_t* terms;  // dimensions, each below the index's dim
  const float* weights;
  int64_t nterms;
};

// Documents per accumulator block (4 MiB of float32 accumulators, one default-sized segment). Each block restarts
// every query term's posting list, which costs more than the accumulators missing the 1 MiB L2 of the AMD EPYC this
// was tuned on: on the 1M synthetic set, 2^20 measured 11% faster than 2^19, 2^19 7% faster than 2^18, and 2^18
// 20% faster than 2^15.
constexpr int64_t kSearchBlock = int64_t(1) << 20;

}  // namespace sr::cpu

// Top k documents of the global id range [lo, hi) for one query, best first (score descending, ties to the lower
// id): writes min(k, hi - lo) scores and ids and returns that count, or -1 when a posting list turned out to be
// malformed (offsets outside [0, nnz] or decreasing, ids out of order or range: every read and write stays in
// bounds regardless). `acc` holds min(kSearchBlock, hi - lo) floats and `cursor` 2 * q.nterms int64s of scratch.
// With `allowed` (one byte per global id; null: every document) only documents whose byte is not 0 are ranked.
SR_SIMD_DECLARE(int64_t search_range(const PostingSegment* segs, int64_t nsegs, const SearchQuery& q, int64_t lo,
                                     int64_t hi, int64_t k, const uint8_t* allowed, float* acc, int64_t* cursor,
                                     float* out_scores, int64_t* out_ids))
// Top k of n candidates (from several search_range calls), best first; returns min(k, n).
SR_SIMD_DECLARE(int64_t merge_top(const float* scores, const int64_t* ids, int64_t n, int64_t k, float* out_scores,
                                  int64_t* out_ids))
// Postings of a CSR batch (a counting sort by column): ptr gets dim + 1 offsets, doc_ids the row of each non-zero,
// weights its value (copied as is: `docs.values` already has the index's weight type).
SR_SIMD_DECLARE(void build_postings(const CsrView& docs, int64_t dim, int64_t* ptr, int32_t* doc_ids,
                                    void* weights))
