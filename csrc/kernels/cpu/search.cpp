#include "kernels/cpu/search.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels/cpu/best_k.h"
#include "kernels/cpu/value_load.h"

namespace sr::cpu::SR_SIMD_NS {
namespace {

// acc[docs[p] - base] += qw * w[p] for the postings from p on whose document lies in [base, base + n) (the block);
// returns the first position past them. Finding that end while scattering replaced a galloping search per list and
// block, whose dependent probes each missed the cache on lists not read yet. Kept scalar on every level: AVX-512
// gather + scatter of the (conflict-free) accumulators measured slower than scalar read-modify-writes on the Zen 4
// this was tuned on; unrolling by four (ids in a list are distinct, so the updates are independent) measured ~10%
// faster. Every id is range-checked (one unsigned compare), so a list whose contents changed after they were checked
// stops early instead of writing out of bounds; the caller detects the stop. The accumulator pointer is shifted by
// -base once, so each update indexes it with the stored id directly.
template <class W>
inline int64_t scatter_postings(float* acc, const int32_t* __restrict docs, const typename W::T* __restrict w,
                                int64_t p, int64_t end, float qw, int32_t base, int32_t n) {
  float* __restrict a = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(acc) - uintptr_t(base) * sizeof(float));
  const auto offset = [&](int32_t d) { return uint32_t(d) - uint32_t(base); };  // unsigned: no overflow
  for (; p + 4 <= end; p += 4) {  // four independent read-modify-writes in flight
    const int32_t d0 = docs[p], d1 = docs[p + 1], d2 = docs[p + 2], d3 = docs[p + 3];
    if (std::max(std::max(offset(d0), offset(d1)), std::max(offset(d2), offset(d3))) >= uint32_t(n)) break;
    const float v0 = qw * W::load(w, p), v1 = qw * W::load(w, p + 1), v2 = qw * W::load(w, p + 2),
                v3 = qw * W::load(w, p + 3);
    a[d0] += v0;
    a[d1] += v1;
    a[d2] += v2;
    a[d3] += v3;
  }
  for (; p < end; ++p) {
    const int32_t d = docs[p];  // read once: the value checked is the value used
    if (offset(d) >= uint32_t(n)) break;
    a[d] += qw * W::load(w, p);
  }
  return p;
}

// Offers acc[0, n) (documents first_id, first_id + 1, ...) to `best`, skipping whole vectors below its floor.
inline void select_block(const float* acc, int64_t n, int64_t first_id, BestK& best) {
  int64_t i = 0;
  for (; i < n && !best.full(); ++i) best.offer(acc[i], first_id + i);
  float floor = best.floor();
#if SR_SIMD_LEVEL == 3
  for (; i + 16 <= n; i += 16) {
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(acc + i), _mm512_set1_ps(floor), _CMP_GT_OQ);
    for (; m; m &= m - 1) {
      const int j = __builtin_ctz(m);
      best.offer(acc[i + j], first_id + i + j);
      floor = best.floor();
    }
  }
#elif SR_SIMD_LEVEL == 2
  for (; i + 8 <= n; i += 8) {
    unsigned m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(acc + i), _mm256_set1_ps(floor), _CMP_GT_OQ));
    for (; m; m &= m - 1) {
      const int j = __builtin_ctz(m);
      best.offer(acc[i + j], first_id + i + j);
      floor = best.floor();
    }
  }
#endif
  for (; i < n; ++i) {
    if (acc[i] > floor) {
      best.offer(acc[i], first_id + i);
      floor = best.floor();
    }
  }
}

// Searches local documents [lo, hi) of one segment; false when a posting list is malformed (see search_range).
template <class W>
bool search_segment(const PostingSegment& seg, const SearchQuery& q, int64_t lo, int64_t hi, float* acc,
                    int64_t* cursor, BestK& best) {
  const auto* w = static_cast<const typename W::T*>(seg.weights);
  int64_t* pos = cursor;
  int64_t* end = cursor + q.nterms;
  for (int64_t t = 0; t < q.nterms; ++t) {
    const int64_t a = seg.ptr[q.terms[t]], b = seg.ptr[q.terms[t] + 1];
    if (!(0 <= a && a <= b && b <= seg.nnz)) return false;
    pos[t] = lo == 0 ? a : std::lower_bound(seg.docs + a, seg.docs + b, int32_t(lo)) - seg.docs;
    end[t] = b;
  }
  for (int64_t block = lo; block < hi; block += kSearchBlock) {
    const int64_t n = std::min(kSearchBlock, hi - block);
    std::fill(acc, acc + n, 0.0f);
    for (int64_t t = 0; t < q.nterms; ++t) {
      pos[t] = scatter_postings<W>(acc, seg.docs, w, pos[t], end[t], q.weights[t], int32_t(block), int32_t(n));
    }
    select_block(acc, n, seg.base + block, best);
  }
  // Sorted lists of ids below ndocs end exactly at `end` once the segment's last document was searched.
  if (hi == seg.ndocs) {
    for (int64_t t = 0; t < q.nterms; ++t) {
      if (pos[t] != end[t]) return false;
    }
  }
  return true;
}

}  // namespace

int64_t search_range(const PostingSegment* segs, int64_t nsegs, const SearchQuery& q, int64_t lo, int64_t hi,
                     int64_t k, const uint8_t* allowed, float* acc, int64_t* cursor, float* out_scores,
                     int64_t* out_ids) {
  BestK best(out_scores, out_ids, k, allowed);
  for (int64_t s = 0; s < nsegs; ++s) {
    const PostingSegment& seg = segs[s];
    const int64_t a = std::max(lo, seg.base), b = std::min(hi, seg.base + seg.ndocs);
    if (a >= b) continue;
    const bool ok = visit_value_type(seg.wtype, [&](auto v) {
      return search_segment<decltype(v)>(seg, q, a - seg.base, b - seg.base, acc, cursor, best);
    });
    if (!ok) return -1;
  }
  return best.finish();
}

int64_t merge_top(const float* scores, const int64_t* ids, int64_t n, int64_t k, float* out_scores,
                  int64_t* out_ids) {
  BestK best(out_scores, out_ids, k);
  for (int64_t i = 0; i < n; ++i) best.offer(scores[i], ids[i]);
  return best.finish();
}

void build_postings(const CsrView& docs, int64_t dim, int64_t* ptr, int32_t* doc_ids, void* weights) {
  const int64_t nnz = docs.indptr[docs.rows];
  const size_t width = docs.vtype == ValueType::F32 ? 4 : 2;
  auto column = [&](int64_t p) {
    return docs.idx64 ? static_cast<const int64_t*>(docs.indices)[p] : static_cast<const int32_t*>(docs.indices)[p];
  };
  std::fill(ptr, ptr + dim + 1, int64_t(0));
  for (int64_t p = 0; p < nnz; ++p) ++ptr[column(p) + 1];
  for (int64_t t = 0; t < dim; ++t) ptr[t + 1] += ptr[t];
  // Rows in order, so each posting list comes out sorted by document; ptr[t] serves as the fill cursor of t and
  // ends up at the start of t + 1, which the final shift restores.
  const auto* src = static_cast<const char*>(docs.values);
  auto* dst = static_cast<char*>(weights);
  for (int64_t r = 0; r < docs.rows; ++r) {
    for (int64_t p = docs.indptr[r]; p < docs.indptr[r + 1]; ++p) {
      const int64_t at = ptr[column(p)]++;
      doc_ids[at] = int32_t(r);
      std::memcpy(dst + at * width, src + p * width, width);
    }
  }
  for (int64_t t = dim; t > 0; --t) ptr[t] = ptr[t - 1];
  ptr[0] = 0;
}

}  // namespace sr::cpu::SR_SIMD_NS
