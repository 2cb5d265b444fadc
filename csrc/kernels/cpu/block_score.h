// Scoring of documents from the forward index of a block-max structure, shared by block-max search and candidate-list
// search (kernels/cpu/block_search.cpp, kernels/cpu/list_search.cpp). Included by kernel files only: it lives in
// the per-level namespace, like best_k.h. Both files are compiled without FMA contraction, so that scores are
// bit-identical to exhaustive search.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/best_k.h"
#include "kernels/cpu/block_search.h"
#include "kernels/cpu/value_load.h"

namespace sr::cpu::SR_SIMD_NS {

// Scores the n documents stored at positions pos(0), pos(1), ... that `allowed` lets through (null: all) against
// the query and offers them to `best`; skipping the others before scoring is what keeps a filtered search from
// paying for documents it cannot return. slot[t] is the position of term t in qslot (0, whose weight is 0, for terms
// outside the query): both stay in L1, where a dense query vector of dim floats does not. Each document's products
// are added in ascending term order, one rounding per product and per sum (this file and search.cpp are compiled
// without FMA contraction), which is how exhaustive search adds a sorted query's terms; products of terms outside
// the query are +0 and leave a sum unchanged. So scores are bit-identical to exhaustive search. Four documents are
// interleaved to hide the latency of the additions. Without `allowed`, a document's user id is read only when its
// score reaches the k-th (a miss per document saved where documents are scattered, as in term lists). Returns false
// when a document's offsets are not within [0, nnz] in order or its user id (where read) is not in [0, ndocs): each
// is read once, checked, then used, so a file changing under a mapped index cannot move a read out of bounds
// (positions must lie in [0, ndocs)). int32 terms are clamped to dim
// (slot[dim] is 0), uint16 ones need no check (the slot map has 65536 entries).
template <class W, class Term, class Pos>
bool score_docs(const BlockMaxIndex& ix, const uint8_t* __restrict slot, const float* __restrict qslot, int64_t n,
                Pos pos, const uint8_t* allowed, BestK& best) {
  const auto* __restrict terms = static_cast<const Term*>(ix.fwd_terms);
  const auto* __restrict w = static_cast<const typename W::T*>(ix.fwd_weights);
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
  bool bad_id = false;
  // ids[j]: the user id, or ~position where not read yet.
  auto offer = [&](float s, int64_t id) {
    if (best.full() && !(s >= best.floor())) return;
    if (id < 0) id = ix.doc_ids[~id];
    if (uint64_t(id) >= uint64_t(ix.ndocs)) {
      bad_id = true;
      return;
    }
    best.offer(s, id);
  };
  constexpr int64_t kChunk = 64;  // documents listed at a time (blocks may hold up to 2^20)
  int64_t lo[kChunk], hi[kChunk], ids[kChunk];
  for (int64_t c = 0; c < n && !bad_id; c += kChunk) {
    int64_t m = 0;
    for (int64_t i = c; i < std::min(n, c + kChunk); ++i) {
      const int64_t d = pos(i);
      const int64_t p = ix.fwd_ptr[d], e = ix.fwd_ptr[d + 1];
      if (!(0 <= p && p <= e && e <= ix.nnz)) return false;
      int64_t id = ~d;
      if (allowed != nullptr) {
        id = ix.doc_ids[d];
        if (uint64_t(id) >= uint64_t(ix.ndocs)) return false;
        if (allowed[id] == 0) continue;
      }
      lo[m] = p;
      hi[m] = e;
      ids[m++] = id;
    }
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      const int64_t p0 = lo[j], p1 = lo[j + 1], p2 = lo[j + 2], p3 = lo[j + 3];
      const int64_t len = std::min(std::min(hi[j] - p0, hi[j + 1] - p1), std::min(hi[j + 2] - p2, hi[j + 3] - p3));
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        s0 += term_product(p0 + i);
        s1 += term_product(p1 + i);
        s2 += term_product(p2 + i);
        s3 += term_product(p3 + i);
      }
      offer(tail(p0 + len, hi[j], s0), ids[j]);
      offer(tail(p1 + len, hi[j + 1], s1), ids[j + 1]);
      offer(tail(p2 + len, hi[j + 2], s2), ids[j + 2]);
      offer(tail(p3 + len, hi[j + 3], s3), ids[j + 3]);
    }
    for (; j < m; ++j) offer(tail(lo[j], hi[j], 0.0f), ids[j]);
  }
  return !bad_id;
}

// Whether score_docs can score the query bit-identically to exhaustive search. The others are left to the exhaustive
// path, which defines what they give: non-finite weights, unsorted or repeated terms, and more than 255 terms (the
// slot map has one byte per term).
inline bool scorable(const SearchQuery& q) {
  if (q.nterms > 255) return false;
  for (int64_t t = 0; t < q.nterms; ++t) {
    if (!std::isfinite(q.weights[t]) || (t > 0 && q.terms[t] <= q.terms[t - 1])) return false;
  }
  return true;
}

// The slot map of a scorable query (see score_docs), and its reset to zeros.
inline void fill_slots(const SearchQuery& q, const BlockScratch& s) {
  s.qslot[0] = 0.0f;
  for (int64_t t = 0; t < q.nterms; ++t) {
    s.slot[q.terms[t]] = uint8_t(t + 1);
    s.qslot[t + 1] = q.weights[t];
  }
}
inline void clear_slots(const SearchQuery& q, const BlockScratch& s) {
  for (int64_t t = 0; t < q.nterms; ++t) s.slot[q.terms[t]] = 0;
}

// The query terms (positions in q) that bound scores: those of positive weight (document weights are >= 0, so the
// others only lower scores), cut to the `query_cut` (> 0) of largest weight x maximum, in ascending term order.
// Writes at most 255 positions to out (q is scorable) and returns their count.
inline int64_t select_bound_terms(const BlockMaxIndex& ix, const SearchQuery& q, int64_t query_cut, int32_t* out) {
  int64_t n = 0;
  for (int64_t t = 0; t < q.nterms; ++t) {
    if (q.weights[t] > 0.0f) out[n++] = int32_t(t);
  }
  if (query_cut > 0 && n > query_cut) {
    const auto larger = [&](int32_t a, int32_t b) {
      return q.weights[a] * ix.scale[q.terms[a]] > q.weights[b] * ix.scale[q.terms[b]] ||
             (q.weights[a] * ix.scale[q.terms[a]] == q.weights[b] * ix.scale[q.terms[b]] && a < b);
    };
    std::nth_element(out, out + query_cut - 1, out + n, larger);
    n = query_cut;
    std::sort(out, out + n);
  }
  return n;
}

// Heap keys of blocks: bound (a positive float, whose bits order like it) above, block number (complemented: ties
// to the lower block) below.
inline uint64_t block_key(float bound, int64_t block) {
  uint32_t bits;
  std::memcpy(&bits, &bound, sizeof bits);
  return (uint64_t(bits) << 32) | uint64_t(~uint32_t(block));
}
inline float key_bound(uint64_t key) {
  const uint32_t bits = uint32_t(key >> 32);
  float bound;
  std::memcpy(&bound, &bits, sizeof bound);
  return bound;
}
inline int64_t key_block(uint64_t key) { return int64_t(~uint32_t(key)); }

// The 8-bit bound of a largest weight mx: the smallest q with q * scale >= mx in float32 (as the kernels dequantize).
inline uint8_t quantize_max(float mx, float scale) {
  float q = std::ceil(mx / scale);
  while (q * scale < mx) q += 1.0f;
  return uint8_t(std::min(q, 255.0f));
}

// The first position in [p, e) of ascending `terms` whose term is >= t (or e). A superblock lists ~1,500 terms
// and a query brings ~26, far apart: windows of 32 whose last term is below t are skipped with one predictable
// comparison each, and the last window is counted with a compare the compiler vectorises (a binary search per
// query term, mispredicting about half its steps, made a superblock cost ~3 us).
template <class Term>
inline int64_t skip_below(const Term* __restrict terms, int64_t p, int64_t e, Term t) {
  constexpr int64_t kWindow = 32;
  while (p + kWindow <= e && terms[p + kWindow - 1] < t) p += kWindow;
  if (p + kWindow <= e) {
    int64_t below = 0;
    for (int64_t j = 0; j < kWindow; ++j) below += terms[p + j] < t ? 1 : 0;
    return p + below;
  }
  while (p < e && terms[p] < t) ++p;
  return p;
}

}  // namespace sr::cpu::SR_SIMD_NS
