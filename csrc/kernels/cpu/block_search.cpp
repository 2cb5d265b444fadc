#include "kernels/cpu/block_search.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/block_score.h"

namespace sr::cpu::SR_SIMD_NS {
namespace {

// ub[b] += qs * row[b] over a row of 8-bit maxima: a superblock's (long, vectorised by the compiler) or a block's
// bounds in a superblock (16 by default, where the compiler's 32-wide loop would leave everything to its scalar
// tail). One rounding per product and per sum at every level (no FMA), so bounds do not depend on the level.
inline void add_dense_row(float* __restrict ub, const uint8_t* __restrict row, int64_t n, float qs) {
  int64_t b = 0;
#if SR_SIMD_LEVEL == 3
  const __m512 w = _mm512_set1_ps(qs);
  for (; b + 16 <= n; b += 16) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b))));
    _mm512_storeu_ps(ub + b, _mm512_add_ps(_mm512_loadu_ps(ub + b), _mm512_mul_ps(w, v)));
  }
#elif SR_SIMD_LEVEL == 2
  const __m256 w = _mm256_set1_ps(qs);
  for (; b + 8 <= n; b += 8) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b))));
    _mm256_storeu_ps(ub + b, _mm256_add_ps(_mm256_loadu_ps(ub + b), _mm256_mul_ps(w, v)));
  }
#endif
  for (; b < n; ++b) ub[b] += qs * float(row[b]);
}

// ub[b] = the sum over r of w[r] * rows[r][b] (added in r's order, from 0), for b in [0, n): the dense rows of a
// query in one pass that writes each bound once, instead of a read-modify-write of all of ub per row. Roundings as
// add_dense_row's.
inline void dense_bounds(float* __restrict ub, const uint8_t* const* rows, const float* w, int64_t nrows, int64_t n) {
  int64_t b = 0;
#if SR_SIMD_LEVEL == 3
  for (; b + 16 <= n; b += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < nrows; ++r) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + b))));
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(w[r]), v));
    }
    _mm512_storeu_ps(ub + b, acc);
  }
#elif SR_SIMD_LEVEL == 2
  for (; b + 8 <= n; b += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t r = 0; r < nrows; ++r) {
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + b))));
      acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(w[r]), v));
    }
    _mm256_storeu_ps(ub + b, acc);
  }
#endif
  for (; b < n; ++b) {
    float acc = 0.0f;
    for (int64_t r = 0; r < nrows; ++r) acc += w[r] * float(rows[r][b]);
    ub[b] = acc;
  }
}

// ub[ids[e]] += qs * vals[e] for e in [0, n) (n_ub >= 1), rounded as add_dense_row rounds. Returns false when an id
// is not below n_ub (written clamped, so nothing lands outside ub). Restrict pointers: through the index's struct
// the compiler reloaded both arrays' addresses after every store to ub (1.16x faster safe search at 2M documents).
// AVX-512 gather/scatter measured 8% slower than this loop.
inline bool add_sparse_entries(float* __restrict ub, const int32_t* __restrict ids, const uint8_t* __restrict vals,
                               int64_t n, int64_t n_ub, float qs) {
  const uint32_t last = uint32_t(n_ub - 1);
  uint32_t bad = 0;
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t sb = uint32_t(ids[e]);
    bad |= uint32_t(sb > last);
    ub[std::min(sb, last)] += qs * float(vals[e]);
  }
  return bad == 0;
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


// Superblocks with a positive bound in decreasing bound order (ties to the lower one), produced lazily: bands
// [kBand x hi, hi) of bounds, from hi = max, are collected with one pass over the bounds each and put in order a
// chunk at a time (most queries stop within the first band).
class SuperblockOrder {
 public:
  SuperblockOrder(const float* ub, int64_t n, int32_t* order, float mx)
      : ub_(ub), n_(n), order_(order), mx_(mx), lo_(mx * kBand) {
    m_ = collect_band(ub_, n_, lo_, hi_, order_);
  }

  // The next superblock, or -1 when none is left.
  int32_t peek() {
    while (j_ == m_) {
      if (lo_ <= 0.0f) return -1;
      hi_ = lo_;
      lo_ = lo_ > mx_ * 1e-6f ? lo_ * kBand : 0.0f;
      m_ = collect_band(ub_, n_, lo_, hi_, order_);
      j_ = sorted_ = 0;
    }
    if (j_ == sorted_) {
      const auto before = [&](int32_t a, int32_t b) { return ub_[a] > ub_[b] || (ub_[a] == ub_[b] && a < b); };
      sorted_ = std::min(m_, j_ + kSortChunk);
      std::nth_element(order_ + j_, order_ + sorted_ - 1, order_ + m_, before);
      std::sort(order_ + j_, order_ + sorted_, before);
    }
    return order_[j_];
  }
  void pop() { ++j_; }

 private:
  const float* ub_;
  int64_t n_;
  int32_t* order_;
  float mx_, lo_, hi_ = std::numeric_limits<float>::infinity();
  int64_t m_ = 0, j_ = 0, sorted_ = 0;
};

template <class W, class Term>
bool search_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, float alpha, int64_t query_cut,
                  const uint8_t* allowed, const BlockScratch& s,
                  float* out_scores, int64_t* out_ids, int64_t* blocks_visited) {
  *blocks_visited = 0;
  const auto malformed = [&] {
    *blocks_visited = -1;
    return false;
  };
  if (!scorable(q)) return false;
  const int64_t ns = ix.nsuper, S = ix.superblock;
  // Terms with negative weights only lower scores (document weights are >= 0): they add nothing to the bounds.
  int32_t bound_terms[256];  // q.nterms <= 255
  const int64_t nbound = select_bound_terms(ix, q, query_cut, bound_terms);
  // Bounds add the terms with dense rows first (one pass writes ub), then the others, each group in term order; block
  // bounds add in the same order, so a block's bound never exceeds its superblock's, bit for bit.
  float bound_weight[256];
  bool dense[256];
  const uint8_t* rows[256];
  float row_weight[256];
  int64_t nrows = 0;
  for (int64_t i = 0; i < nbound; ++i) {
    const int64_t term = q.terms[bound_terms[i]];
    bound_weight[i] = q.weights[bound_terms[i]] * ix.scale[term];
    const int64_t row = ix.sb_dense_row[term];
    if (row >= ix.sb_dense_rows) return malformed();
    dense[i] = row >= 0;
    if (dense[i]) {
      rows[nrows] = ix.sb_dense + row * ns;
      row_weight[nrows++] = bound_weight[i];
    }
  }
  dense_bounds(s.ub, rows, row_weight, nrows, ns);
  for (int64_t i = 0; i < nbound; ++i) {
    if (dense[i]) continue;
    const int64_t term = q.terms[bound_terms[i]];
    const float qs = bound_weight[i];
    const int64_t a = ix.sb_ptr[term], b = ix.sb_ptr[term + 1];
    if (!(0 <= a && a <= b && b <= ix.sb_entries)) return malformed();
    if (!add_sparse_entries(s.ub, ix.sb_ids + a, ix.sb_values + a, b - a, ns, qs)) return malformed();
  }
  const float mx = max_bound(s.ub, ns);
  if (!(mx > 0.0f)) return false;
  fill_slots(q, s);

  // Bounds and scores round differently: the bounds get a margin of 4 units in the last place per added term.
  const float margin = 1.0f + float(q.nterms + 4) * 2.4e-7f;
  BestK best(out_scores, out_ids, k);  // score_docs offers allowed documents only
  const auto beaten = [&](float bound) { return best.full() && best.floor() > bound * margin; };
  const auto* bterms = static_cast<const Term*>(ix.blk_terms);
  int64_t heap_size = 0;
  int64_t match_at[256];
  int32_t match_term[256];
  // Bounds the blocks of superblock sb (merging the bound terms with its terms, both ascending) and queues those
  // that can still beat the k-th score.
  const auto expand = [&](int64_t sb) {
    if (S == 1) {  // the block is the superblock: same bound, bit for bit (and no superblock-major lists)
      if (!beaten(s.ub[sb])) {
        s.heap[heap_size++] = block_key(s.ub[sb], sb);
        std::push_heap(s.heap, s.heap + heap_size);
      }
      return true;
    }
    const int64_t a = ix.blk_ptr[sb], e = ix.blk_ptr[sb + 1];
    if (!(0 <= a && a <= e && e <= ix.blk_entries)) return false;
    std::fill(s.blk_ub, s.blk_ub + S, 0.0f);
    // Matches first, their bounds prefetched, then added: the bounds of a superblock sit in a random place of a
    // large array, and looking them up one at a time waited out a memory latency per query term.
    int64_t matches = 0;
    for (int64_t i = 0, p = a; i < nbound && p < e; ++i) {
      const int64_t term = q.terms[bound_terms[i]];
      p = skip_below(bterms, p, e, Term(term));
      if (p < e && int64_t(bterms[p]) == term) {
        __builtin_prefetch(ix.blk_values + S * p);
        match_at[matches] = p;
        match_term[matches++] = int32_t(i);
      }
    }
    for (const bool dense_first : {true, false}) {
      for (int64_t j = 0; j < matches; ++j) {
        if (dense[match_term[j]] != dense_first) continue;
        add_dense_row(s.blk_ub, ix.blk_values + S * match_at[j], S, bound_weight[match_term[j]]);
      }
    }
    const int64_t first = sb * S, nblk = std::min(S, ix.nblocks - first);
    for (int64_t j = 0; j < nblk; ++j) {
      if (s.blk_ub[j] > 0.0f && !beaten(s.blk_ub[j])) {
        s.heap[heap_size++] = block_key(s.blk_ub[j], first + j);
        std::push_heap(s.heap, s.heap + heap_size);
      }
    }
    return true;
  };

  // Blocks are scored in decreasing bound order (ties to the lower block) across the whole index, as if every
  // block had been bounded: a superblock is expanded before any block whose bound is not above its own (a block's
  // bound never exceeds its superblock's: same terms in the same order, smaller maxima). So the blocks scored are
  // a prefix of one order that depends on the bounds only, alpha only cuts it shorter, and recall grows with alpha.
  SuperblockOrder supers(s.ub, ns, s.order, mx);
  int64_t visited = 0;
  while (true) {
    const int32_t sb = supers.peek();
    const float top_super = sb >= 0 ? s.ub[sb] : 0.0f;
    const float top_block = heap_size > 0 ? key_bound(s.heap[0]) : 0.0f;
    const float top = std::max(top_super, top_block);
    if (!(top > 0.0f) || beaten(alpha * top)) break;
    if (sb >= 0 && top_super >= top_block) {
      supers.pop();
      if (!expand(sb)) {
        visited = -1;
        break;
      }
      continue;
    }
    std::pop_heap(s.heap, s.heap + heap_size--);
    const int64_t d = key_block(s.heap[heap_size]) * ix.block_size;
    const auto in_block = [d](int64_t i) { return d + i; };
    if (!score_docs<W, Term>(ix, s.slot, s.qslot, std::min(ix.ndocs - d, ix.block_size), in_block, allowed, best)) {
      visited = -1;
      break;
    }
    ++visited;
  }
  clear_slots(q, s);
  if (visited < 0) return malformed();
  *blocks_visited = visited;
  const bool complete = best.full() && best.floor() > 0.0f;
  best.finish();
  return complete;
}

template <class W, class Term>
bool scan_query(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, const int64_t* positions, int64_t npos,
                const uint8_t* allowed, const BlockScratch& s, float* out_scores, int64_t* out_ids,
                int64_t* scored) {
  *scored = 0;
  if (!scorable(q)) return false;
  fill_slots(q, s);
  BestK best(out_scores, out_ids, k);
  const auto listed = [positions](int64_t i) { return positions[i]; };
  const bool ok = score_docs<W, Term>(ix, s.slot, s.qslot, npos, listed, allowed, best);
  clear_slots(q, s);
  *scored = ok ? npos : -1;
  if (!ok) return false;
  best.finish();
  return true;
}

}  // namespace

bool scan_positions(const BlockMaxIndex& ix, const SearchQuery& q, int64_t k, const int64_t* positions,
                    int64_t npos, const uint8_t* allowed, const BlockScratch& scratch, float* out_scores,
                    int64_t* out_ids, int64_t* scored) {
  return visit_value_type(ix.wtype, [&](auto v) {
    using W = decltype(v);
    return ix.terms16
               ? scan_query<W, uint16_t>(ix, q, k, positions, npos, allowed, scratch, out_scores, out_ids, scored)
               : scan_query<W, int32_t>(ix, q, k, positions, npos, allowed, scratch, out_scores, out_ids, scored);
  });
}

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


template <class W, class Term>
int64_t term_maxima_impl(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, int64_t ndocs,
                         int64_t dim, int64_t group, int64_t min_dense, float* scale, int64_t* dense_row,
                         int64_t* ptr, uint8_t* dense, int32_t* groups, uint8_t* values) {
  const int64_t ngroups = (ndocs + group - 1) / group;
  std::vector<float> gmax(dim, -1.0f);
  std::vector<int64_t> touched;
  // Calls emit(term, group, max weight) for every term present in every group, groups in order.
  auto each_group_max = [&](auto&& emit) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t e = fwd_ptr[std::min(ndocs, (g + 1) * group)];
      for (int64_t p = fwd_ptr[g * group]; p < e; ++p) {
        const int64_t t = terms[p];
        const float v = W::load(w, p);
        if (gmax[t] < 0.0f) touched.push_back(t);
        gmax[t] = std::max(gmax[t], v);
      }
      for (const int64_t t : touched) {
        emit(t, g, gmax[t]);
        gmax[t] = -1.0f;
      }
      touched.clear();
    }
  };
  const bool fill = dense != nullptr || groups != nullptr;
  if (!fill) {
    std::fill(scale, scale + dim, 0.0f);
    const int64_t nnz = fwd_ptr[ndocs];
    for (int64_t p = 0; p < nnz; ++p) scale[terms[p]] = std::max(scale[terms[p]], W::load(w, p));
    for (int64_t t = 0; t < dim; ++t) {  // slightly above max / 255, so that the largest weight quantizes to <= 255
      scale[t] = scale[t] > 0.0f ? float(double(scale[t]) / 255.0 * (1.0 + 0x1p-20)) : 1.0f;
    }
    std::fill(ptr, ptr + dim + 1, int64_t(0));
    each_group_max([&](int64_t t, int64_t, float) { ++ptr[t + 1]; });
    int64_t rows = 0;
    for (int64_t t = 0; t < dim; ++t) {
      dense_row[t] = ptr[t + 1] >= min_dense ? rows++ : -1;
      if (dense_row[t] >= 0) ptr[t + 1] = 0;
    }
    for (int64_t t = 0; t < dim; ++t) ptr[t + 1] += ptr[t];
    return rows;
  }
  std::vector<int64_t> cursor(ptr, ptr + dim);
  each_group_max([&](int64_t t, int64_t g, float mx) {
    const uint8_t v = quantize_max(mx, scale[t]);
    if (dense_row[t] >= 0) {
      dense[dense_row[t] * ngroups + g] = v;
    } else {
      groups[cursor[t]] = int32_t(g);
      values[cursor[t]++] = v;
    }
  });
  return 0;
}

template <class W, class Term>
void superblock_maxima_impl(const int64_t* fwd_ptr, const Term* terms, const typename W::T* w, int64_t ndocs,
                            int64_t dim, int64_t block_size, int64_t S, const float* scale, int64_t s_lo,
                            int64_t s_hi, int64_t* counts, const int64_t* ptr, Term* out_terms, uint8_t* values) {
  std::vector<int32_t> local(dim, -1);  // a term's row in bmax, -1 when not in the superblock
  std::vector<Term> touched;
  std::vector<float> bmax;  // touched.size() x S block maxima
  for (int64_t s = s_lo; s < s_hi; ++s) {
    for (int64_t j = 0; j < S && (s * S + j) * block_size < ndocs; ++j) {
      const int64_t d = (s * S + j) * block_size;
      const int64_t e = fwd_ptr[std::min(ndocs, d + block_size)];
      for (int64_t p = fwd_ptr[d]; p < e; ++p) {
        const Term t = terms[p];
        if (local[t] < 0) {
          local[t] = int32_t(touched.size());
          touched.push_back(t);
          bmax.resize(bmax.size() + S, 0.0f);
        }
        float& m = bmax[local[t] * S + j];
        m = std::max(m, W::load(w, p));
      }
    }
    if (counts != nullptr) {
      counts[s - s_lo] = int64_t(touched.size());
    } else {
      std::sort(touched.begin(), touched.end());
      for (size_t i = 0; i < touched.size(); ++i) {
        const Term t = touched[i];
        out_terms[ptr[s] + i] = t;
        for (int64_t j = 0; j < S; ++j) {
          values[(ptr[s] + int64_t(i)) * S + j] = quantize_max(bmax[local[t] * S + j], scale[t]);
        }
      }
    }
    for (const Term t : touched) local[t] = -1;
    touched.clear();
    bmax.clear();
  }
}

}  // namespace

int64_t term_maxima(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16, const void* fwd_weights,
                    ValueType wtype, int64_t ndocs, int64_t dim, int64_t group, int64_t min_dense, float* scale,
                    int64_t* dense_row, int64_t* ptr, uint8_t* dense, int32_t* groups, uint8_t* values) {
  return visit_value_type(wtype, [&](auto v) {
    using W = decltype(v);
    const auto* w = static_cast<const typename W::T*>(fwd_weights);
    return terms16 ? term_maxima_impl<W>(fwd_ptr, static_cast<const uint16_t*>(fwd_terms), w, ndocs, dim, group,
                                         min_dense, scale, dense_row, ptr, dense, groups, values)
                   : term_maxima_impl<W>(fwd_ptr, static_cast<const int32_t*>(fwd_terms), w, ndocs, dim, group,
                                         min_dense, scale, dense_row, ptr, dense, groups, values);
  });
}

void superblock_maxima(const int64_t* fwd_ptr, const void* fwd_terms, bool terms16, const void* fwd_weights,
                       ValueType wtype, int64_t ndocs, int64_t dim, int64_t block_size, int64_t superblock,
                       const float* scale, int64_t s_lo, int64_t s_hi, int64_t* counts, const int64_t* ptr,
                       void* terms, uint8_t* values) {
  visit_value_type(wtype, [&](auto v) {
    using W = decltype(v);
    const auto* w = static_cast<const typename W::T*>(fwd_weights);
    if (terms16) {
      superblock_maxima_impl<W>(fwd_ptr, static_cast<const uint16_t*>(fwd_terms), w, ndocs, dim, block_size,
                                superblock, scale, s_lo, s_hi, counts, ptr, static_cast<uint16_t*>(terms), values);
    } else {
      superblock_maxima_impl<W>(fwd_ptr, static_cast<const int32_t*>(fwd_terms), w, ndocs, dim, block_size,
                                superblock, scale, s_lo, s_hi, counts, ptr, static_cast<int32_t*>(terms), values);
    }
    return 0;
  });
}

}  // namespace sr::cpu::SR_SIMD_NS
