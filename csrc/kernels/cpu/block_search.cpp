#include "kernels/cpu/block_search.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/best_k.h"
#include "kernels/cpu/value_load.h"

namespace sr::cpu::SR_SIMD_NS {
namespace {

// Scores documents [d, end) against the dense query q. Each document's products are added in ascending term order,
// one rounding per product and per sum (this file and search.cpp are compiled without FMA contraction), which is
// the order exhaustive search adds a sorted query's terms in: scores are bit-identical to it. Four documents are
// interleaved to hide the latency of the dependent additions.
template <class W, class Term>
void score_docs(const BlockMaxIndex& ix, const float* __restrict q, int64_t d, int64_t end, BestK& best) {
  const auto* __restrict terms = static_cast<const Term*>(ix.fwd_terms);
  const auto* __restrict w = static_cast<const typename W::T*>(ix.fwd_weights);
  const int64_t* ptr = ix.fwd_ptr;
  auto tail = [&](int64_t p, int64_t e, float s) {
    for (; p < e; ++p) s += q[terms[p]] * W::load(w, p);
    return s;
  };
  for (; d + 4 <= end; d += 4) {
    const int64_t p0 = ptr[d], p1 = ptr[d + 1], p2 = ptr[d + 2], p3 = ptr[d + 3], e3 = ptr[d + 4];
    const int64_t m = std::min(std::min(p1 - p0, p2 - p1), std::min(p3 - p2, e3 - p3));
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int64_t i = 0; i < m; ++i) {
      s0 += q[terms[p0 + i]] * W::load(w, p0 + i);
      s1 += q[terms[p1 + i]] * W::load(w, p1 + i);
      s2 += q[terms[p2 + i]] * W::load(w, p2 + i);
      s3 += q[terms[p3 + i]] * W::load(w, p3 + i);
    }
    s0 = tail(p0 + m, p1, s0);
    s1 = tail(p1 + m, p2, s1);
    s2 = tail(p2 + m, p3, s2);
    s3 = tail(p3 + m, e3, s3);
    const float s[4] = {s0, s1, s2, s3};
    for (int j = 0; j < 4; ++j) {
      if (!best.full() || s[j] >= best.floor()) best.offer(s[j], ix.doc_ids[d + j]);
    }
  }
  for (; d < end; ++d) {
    const float s = tail(ptr[d], ptr[d + 1], 0.0f);
    if (!best.full() || s >= best.floor()) best.offer(s, ix.doc_ids[d]);
  }
}

// ub[b] += qs * row[b] over a dense row of block maxima (vectorised by the compiler at each level).
inline void add_dense_row(float* __restrict ub, const uint8_t* __restrict row, int64_t n, float qs) {
  for (int64_t b = 0; b < n; ++b) ub[b] += qs * float(row[b]);
}

template <class W, class Term>
bool search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha, const BlockScratch& s,
                  float* out_scores, int64_t* out_ids, int64_t* blocks_visited) {
  *blocks_visited = 0;
  for (int64_t t = 0; t < q.nterms; ++t) {  // the exhaustive path defines what these give
    if (!std::isfinite(q.weights[t]) || (t > 0 && q.terms[t] <= q.terms[t - 1])) return false;
  }
  const int64_t nb = ix.nblocks;
  std::fill(s.ub, s.ub + nb, 0.0f);
  // Terms with negative weights only lower scores (document weights are >= 0): they add nothing to the bounds.
  for (int64_t t = 0; t < q.nterms; ++t) {
    const float w = q.weights[t];
    if (!(w > 0.0f)) continue;
    const int64_t term = q.terms[t];
    const float qs = w * ix.scale[term];
    if (ix.dense_row[term] >= 0) {
      add_dense_row(s.ub, ix.bm_dense + ix.dense_row[term] * nb, nb, qs);
    } else {
      for (int64_t e = ix.bm_ptr[term]; e < ix.bm_ptr[term + 1]; ++e) s.ub[ix.bm_blocks[e]] += qs * float(ix.bm_values[e]);
    }
  }
  float mx = 0.0f;
  for (int64_t b = 0; b < nb; ++b) mx = std::max(mx, s.ub[b]);
  if (!(mx > 0.0f)) return false;

  // Bucket sort of the blocks with a positive bound, best bucket first; bucket_max keeps each bucket's real maximum.
  const float inv = float(kBoundBuckets) / mx;
  int32_t* start = s.bucket_start;
  std::fill(start, start + kBoundBuckets + 1, 0);
  std::fill(s.bucket_max, s.bucket_max + kBoundBuckets, 0.0f);
  auto bucket_of = [&](float u) {
    return kBoundBuckets - 1 - std::min<int64_t>(kBoundBuckets - 1, int64_t(u * inv));  // 0 = best
  };
  for (int64_t b = 0; b < nb; ++b) {
    if (s.ub[b] > 0.0f) {
      const int64_t bk = bucket_of(s.ub[b]);
      ++start[bk + 1];
      s.bucket_max[bk] = std::max(s.bucket_max[bk], s.ub[b]);
    }
  }
  for (int64_t i = 0; i < kBoundBuckets; ++i) start[i + 1] += start[i];
  const int32_t ncand = start[kBoundBuckets];
  for (int64_t b = 0; b < nb; ++b) {  // start[bk] ends up at the end of bucket bk, i.e. the start of bk + 1
    if (s.ub[b] > 0.0f) s.order[start[bucket_of(s.ub[b])]++] = int32_t(b);
  }
  for (int64_t t = 0; t < q.nterms; ++t) s.q[q.terms[t]] = q.weights[t];

  // Bounds and scores round differently: the bounds get a margin of 4 units in the last place per added term.
  const float margin = 1.0f + float(q.nterms + 4) * 2.4e-7f;
  BestK best(out_scores, out_ids, k);
  int64_t visited = 0;
  int32_t pos = 0;
  for (int64_t bk = 0; bk < kBoundBuckets && pos < ncand; ++bk) {
    const int32_t end = start[bk];  // after the placement pass start[bk] is this bucket's end
    if (pos == end) continue;
    if (best.full() && best.floor() > alpha * s.bucket_max[bk] * margin) break;
    for (; pos < end; ++pos) {
      const int32_t b = s.order[pos];
      if (best.full() && best.floor() > s.ub[b] * margin) continue;  // cannot hold a better document
      const int64_t d = int64_t(b) * ix.block_size;
      score_docs<W, Term>(ix, s.q, d, std::min(ix.ndocs, d + ix.block_size), best);
      ++visited;
    }
  }
  for (int64_t t = 0; t < q.nterms; ++t) s.q[q.terms[t]] = 0.0f;
  *blocks_visited = visited;
  const bool complete = best.full() && best.floor() > 0.0f;
  best.finish();
  return complete;
}

}  // namespace

bool block_search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha,
                        const BlockScratch& scratch, float* out_scores, int64_t* out_ids, int64_t* blocks_visited) {
  return visit_value_type(ix.wtype, [&](auto v) {
    using W = decltype(v);
    return ix.terms16 ? search_query<W, uint16_t>(ix, q, k, alpha, scratch, out_scores, out_ids, blocks_visited)
                      : search_query<W, int32_t>(ix, q, k, alpha, scratch, out_scores, out_ids, blocks_visited);
  });
}

}  // namespace sr::cpu::SR_SIMD_NS
