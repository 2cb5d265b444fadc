#include "kernels/cpu/block_search.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/best_k.h"
#include "kernels/cpu/value_load.h"

namespace sr::cpu::SR_SIMD_NS {
namespace {

// Scores documents [d, end) against the query and offers them to `best`. slot[t] is the position of term t in
// qslot (0, whose weight is 0, for terms outside the query): both stay in L1, where a dense query vector of dim
// floats does not. Each document's products are added in ascending term order, one rounding per product and per
// sum (this file and search.cpp are compiled without FMA contraction), which is how exhaustive search adds a
// sorted query's terms; products of terms outside the query are +0 and leave a sum unchanged. So scores are
// bit-identical to exhaustive search. Four documents are interleaved to hide the latency of the additions.
// Returns false (scoring nothing) when the block's offsets are not monotone within [0, nnz] or a user id is not
// in [0, ndocs) (a change racing the search after this check is not covered); int32 terms are
// clamped to dim (slot[dim] is 0), uint16 ones need no check (the slot map has 65536 entries).
template <class W, class Term>
bool score_docs(const BlockMaxIndex& ix, const uint8_t* __restrict slot, const float* __restrict qslot, int64_t d,
                int64_t end, BestK& best) {
  const auto* __restrict terms = static_cast<const Term*>(ix.fwd_terms);
  const auto* __restrict w = static_cast<const typename W::T*>(ix.fwd_weights);
  const int64_t* ptr = ix.fwd_ptr;
  for (int64_t i = d; i < end; ++i) {
    if (!(0 <= ptr[i] && ptr[i] <= ptr[i + 1] && ptr[i + 1] <= ix.nnz)) return false;
    if (uint64_t(ix.doc_ids[i]) >= uint64_t(ix.ndocs)) return false;  // ids index the caller's filter
  }
  auto slot_of = [&](int64_t p) -> uint8_t {
    if constexpr (sizeof(Term) == 2) {
      return slot[terms[p]];
    } else {
      return slot[std::min(uint32_t(terms[p]), uint32_t(ix.dim))];
    }
  };
  auto term_product = [&](int64_t p) { return qslot[slot_of(p)] * W::load(w, p); };
  auto tail = [&](int64_t p, int64_t e, float s) {
    for (; p < e; ++p) s += term_product(p);
    return s;
  };
  auto offer = [&](float s, int64_t doc) {
    if (!best.full() || s >= best.floor()) best.offer(s, ix.doc_ids[doc]);
  };
  for (; d + 4 <= end; d += 4) {
    const int64_t p0 = ptr[d], p1 = ptr[d + 1], p2 = ptr[d + 2], p3 = ptr[d + 3], e3 = ptr[d + 4];
    const int64_t m = std::min(std::min(p1 - p0, p2 - p1), std::min(p3 - p2, e3 - p3));
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int64_t i = 0; i < m; ++i) {
      s0 += term_product(p0 + i);
      s1 += term_product(p1 + i);
      s2 += term_product(p2 + i);
      s3 += term_product(p3 + i);
    }
    offer(tail(p0 + m, p1, s0), d);
    offer(tail(p1 + m, p2, s1), d + 1);
    offer(tail(p2 + m, p3, s2), d + 2);
    offer(tail(p3 + m, e3, s3), d + 3);
  }
  for (; d < end; ++d) offer(tail(ptr[d], ptr[d + 1], 0.0f), d);
  return true;
}

// ub[b] += qs * row[b] over a dense row of block maxima (vectorised by the compiler at each level).
inline void add_dense_row(float* __restrict ub, const uint8_t* __restrict row, int64_t n, float qs) {
  for (int64_t b = 0; b < n; ++b) ub[b] += qs * float(row[b]);
}

// The largest of ub[0, n) (all >= 0).
inline float max_bound(const float* ub, int64_t n) {
  int64_t b = 0;
  float mx = 0.0f;
#if SR_SIMD_LEVEL == 3
  __m512 m = _mm512_setzero_ps();
  for (; b + 16 <= n; b += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(ub + b));
  mx = _mm512_reduce_max_ps(m);
#elif SR_SIMD_LEVEL == 2
  __m256 m = _mm256_setzero_ps();
  for (; b + 8 <= n; b += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(ub + b));
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  for (float v : lanes) mx = std::max(mx, v);
#endif
  for (; b < n; ++b) mx = std::max(mx, ub[b]);
  return mx;
}

// Writes the blocks b with lo <= ub[b] < hi and ub[b] > 0 to out, in increasing order; returns their count.
inline int64_t collect_band(const float* ub, int64_t n, float lo, float hi, int32_t* out) {
  int64_t b = 0, m = 0;
#if SR_SIMD_LEVEL == 3
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), zero = _mm512_setzero_ps();
  const __m512i step = _mm512_set1_epi32(16);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; b + 16 <= n; b += 16, ids = _mm512_add_epi32(ids, step)) {
    const __m512 u = _mm512_loadu_ps(ub + b);
    const __mmask16 in = _mm512_cmp_ps_mask(u, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(u, vhi, _CMP_LT_OQ) &
                         _mm512_cmp_ps_mask(u, zero, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_epi32(out + m, in, ids);
    m += __builtin_popcount(in);
  }
#endif
  for (; b < n; ++b) {
    const float u = ub[b];
    if (u >= lo && u < hi && u > 0.0f) out[m++] = int32_t(b);
  }
  return m;
}

constexpr int64_t kSortChunk = 32;
// Each band spans [kBand x hi, hi): narrow, because the top of the bound range is crowded (terms common to most
// blocks) and ordering a band costs more than another SIMD pass over the bounds.
constexpr float kBand = 0.6f;

template <class W, class Term>
bool search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha, int64_t query_cut,
                  const uint8_t* allowed, const BlockScratch& s,
                  float* out_scores, int64_t* out_ids, int64_t* blocks_visited) {
  *blocks_visited = 0;
  const auto malformed = [&] {
    *blocks_visited = -1;
    return false;
  };
  // Left to the exhaustive path, which defines what they give: non-finite weights, unsorted or repeated terms, and
  // more than 255 terms (the slot map below has one byte per term).
  if (q.nterms > 255) return false;
  for (int64_t t = 0; t < q.nterms; ++t) {
    if (!std::isfinite(q.weights[t]) || (t > 0 && q.terms[t] <= q.terms[t - 1])) return false;
  }
  const int64_t nb = ix.nblocks;
  std::fill(s.ub, s.ub + nb, 0.0f);
  // Terms with negative weights only lower scores (document weights are >= 0): they add nothing to the bounds.
  int32_t bound_terms[256];  // q.nterms <= 255
  int64_t nbound = 0;
  for (int64_t t = 0; t < q.nterms; ++t) {
    if (q.weights[t] > 0.0f) bound_terms[nbound++] = int32_t(t);
  }
  if (query_cut > 0 && nbound > query_cut) {
    const auto larger = [&](int32_t a, int32_t b) {
      return q.weights[a] * ix.scale[q.terms[a]] > q.weights[b] * ix.scale[q.terms[b]] ||
             (q.weights[a] * ix.scale[q.terms[a]] == q.weights[b] * ix.scale[q.terms[b]] && a < b);
    };
    std::nth_element(bound_terms, bound_terms + query_cut - 1, bound_terms + nbound, larger);
    nbound = query_cut;
  }
  for (int64_t i = 0; i < nbound; ++i) {
    const int64_t t = bound_terms[i];
    const int64_t term = q.terms[t];
    const float qs = q.weights[t] * ix.scale[term];
    const int64_t row = ix.dense_row[term];
    if (row >= ix.dense_rows) return malformed();
    if (row >= 0) {
      add_dense_row(s.ub, ix.bm_dense + row * nb, nb, qs);
      continue;
    }
    const int64_t a = ix.bm_ptr[term], b = ix.bm_ptr[term + 1];
    if (!(0 <= a && a <= b && b <= ix.entries)) return malformed();
    for (int64_t e = a; e < b; ++e) {
      const uint32_t blk = uint32_t(ix.bm_blocks[e]);
      if (blk >= uint64_t(nb)) return malformed();
      s.ub[blk] += qs * float(ix.bm_values[e]);
    }
  }
  const float mx = max_bound(s.ub, nb);
  if (!(mx > 0.0f)) return false;
  s.qslot[0] = 0.0f;
  for (int64_t t = 0; t < q.nterms; ++t) {
    s.slot[q.terms[t]] = uint8_t(t + 1);
    s.qslot[t + 1] = q.weights[t];
  }

  // Blocks are visited in decreasing bound order (ties to the lower block): bands [kBand x hi, hi) of bounds, from
  // hi = max, are collected with one pass over the bounds each and put in order a chunk at a time.
  // The visiting order depends on the bounds only and alpha only on where it stops, so a smaller alpha visits a
  // prefix of the blocks a larger one visits. Bounds and scores round differently: the bounds get a margin of
  // 4 units in the last place per added term.
  const float margin = 1.0f + float(q.nterms + 4) * 2.4e-7f;
  BestK best(out_scores, out_ids, k, allowed);
  int64_t visited = 0;
  bool stopped = false;
  float hi = std::numeric_limits<float>::infinity();
  for (float lo = mx * kBand; !stopped && hi > 0.0f; hi = lo, lo = lo > mx * 1e-6f ? lo * kBand : 0.0f) {
    if (best.full() && best.floor() > alpha * std::min(hi, mx) * margin) break;
    const int64_t m = collect_band(s.ub, nb, lo, hi, s.order);
    const auto before = [&](int32_t a, int32_t b) { return s.ub[a] > s.ub[b] || (s.ub[a] == s.ub[b] && a < b); };
    for (int64_t j = 0; j < m && !stopped; ++j) {
      if (j % kSortChunk == 0) {  // order the band lazily, a chunk at a time: most queries stop in the first
        const int64_t e = std::min(m, j + kSortChunk);
        std::nth_element(s.order + j, s.order + e - 1, s.order + m, before);
        std::sort(s.order + j, s.order + e, before);
      }
      const int32_t b = s.order[j];
      if (best.full() && best.floor() > alpha * s.ub[b] * margin) {
        stopped = true;
        continue;
      }
      const int64_t d = int64_t(b) * ix.block_size;
      if (!score_docs<W, Term>(ix, s.slot, s.qslot, d, std::min(ix.ndocs, d + ix.block_size), best)) {
        for (int64_t t = 0; t < q.nterms; ++t) s.slot[q.terms[t]] = 0;
        return malformed();
      }
      ++visited;
    }
  }
  for (int64_t t = 0; t < q.nterms; ++t) s.slot[q.terms[t]] = 0;
  *blocks_visited = visited;
  const bool complete = best.full() && best.floor() > 0.0f;
  best.finish();
  return complete;
}

}  // namespace

bool block_search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha, int64_t query_cut,
                        const uint8_t* allowed, const BlockScratch& scratch, float* out_scores, int64_t* out_ids,
                        int64_t* blocks_visited) {
  return visit_value_type(ix.wtype, [&](auto v) {
    using W = decltype(v);
    return ix.terms16 ? search_query<W, uint16_t>(ix, q, k, alpha, query_cut, allowed, scratch, out_scores, out_ids,
                                                  blocks_visited)
                      : search_query<W, int32_t>(ix, q, k, alpha, query_cut, allowed, scratch, out_scores, out_ids,
                                                 blocks_visited);
  });
}

}  // namespace sr::cpu::SR_SIMD_NS

namespace sr::cpu::SR_SIMD_NS {
namespace {

// The end of block b's postings.
inline int64_t ptr_end(const int64_t* fwd_ptr, int64_t b, int64_t block_size, int64_t ndocs) {
  return fwd_ptr[std::min(ndocs, (b + 1) * block_size)];
}

template <class W, class Term>
int64_t block_maxima_impl(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, int64_t ndocs,
                          int64_t dim, int64_t block_size, int64_t min_dense, float* scale, int64_t* dense_row,
                          int64_t* ptr, uint8_t* dense, int32_t* blocks, uint8_t* values) {
  const int64_t nblocks = (ndocs + block_size - 1) / block_size;
  std::vector<float> bmax(dim, -1.0f);
  std::vector<int64_t> touched;
  // Calls emit(term, block, max weight) for every term present in every block, blocks in order.
  auto each_block_max = [&](auto&& emit) {
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t e = ptr_end(fwd_ptr, b, block_size, ndocs);
      for (int64_t p = fwd_ptr[b * block_size]; p < e; ++p) {
        const int64_t t = terms[p];
        const float v = W::load(w, p);
        if (bmax[t] < 0.0f) touched.push_back(t);
        bmax[t] = std::max(bmax[t], v);
      }
      for (const int64_t t : touched) {
        emit(t, b, bmax[t]);
        bmax[t] = -1.0f;
      }
      touched.clear();
    }
  };
  const bool fill = dense != nullptr || blocks != nullptr;
  if (!fill) {
    std::fill(scale, scale + dim, 0.0f);
    const int64_t nnz = fwd_ptr[ndocs];
    for (int64_t p = 0; p < nnz; ++p) scale[terms[p]] = std::max(scale[terms[p]], W::load(w, p));
    for (int64_t t = 0; t < dim; ++t) {  // slightly above max / 255, so that the largest weight quantizes to <= 255
      scale[t] = scale[t] > 0.0f ? float(double(scale[t]) / 255.0 * (1.0 + 0x1p-20)) : 1.0f;
    }
    std::fill(ptr, ptr + dim + 1, int64_t(0));
    each_block_max([&](int64_t t, int64_t, float) { ++ptr[t + 1]; });
    int64_t rows = 0;
    for (int64_t t = 0; t < dim; ++t) {
      dense_row[t] = ptr[t + 1] >= min_dense ? rows++ : -1;
      if (dense_row[t] >= 0) ptr[t + 1] = 0;
    }
    for (int64_t t = 0; t < dim; ++t) ptr[t + 1] += ptr[t];
    return rows;
  }
  std::vector<int64_t> cursor(ptr, ptr + dim);
  each_block_max([&](int64_t t, int64_t b, float mx) {
    float q = std::ceil(mx / scale[t]);
    while (q * scale[t] < mx) q += 1.0f;  // the kernels dequantize as q * scale in float32
    const uint8_t v = uint8_t(std::min(q, 255.0f));
    if (dense_row[t] >= 0) {
      dense[dense_row[t] * nblocks + b] = v;
    } else {
      blocks[cursor[t]] = int32_t(b);
      values[cursor[t]++] = v;
    }
  });
  return 0;
}

}  // namespace

int64_t block_maxima(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16, const void* fwd_weights,
                     ValueType wtype, int64_t ndocs, int64_t dim, int64_t block_size, int64_t min_dense, float* scale,
                     int64_t* dense_row, int64_t* ptr, uint8_t* dense, int32_t* blocks, uint8_t* values) {
  return visit_value_type(wtype, [&](auto v) {
    using W = decltype(v);
    const auto* w = static_cast<const typename W::T*>(fwd_weights);
    return terms16 ? block_maxima_impl<W>(fwd_ptr, static_cast<const uint16_t*>(fwd_terms), w, ndocs, dim,
                                          block_size, min_dense, scale, dense_row, ptr, dense, blocks, values)
                   : block_maxima_impl<W>(fwd_ptr, static_cast<const int32_t*>(fwd_terms), w, ndocs, dim,
                                          block_size, min_dense, scale, dense_row, ptr, dense, blocks, values);
  });
}

}  // namespace sr::cpu::SR_SIMD_NS
