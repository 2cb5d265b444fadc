#include "kernels/cpu/sparse_dot.h"

#include "kernels/cpu/value_load.h"

namespace sr::cpu::SR_SIMD_NS {
namespace {

template <class V, class I>
struct Rows {
  const int64_t* ptr;
  const I* idx;
  const typename V::T* val;
  explicit Rows(const CsrView& c)
      : ptr(c.indptr), idx(static_cast<const I*>(c.indices)), val(static_cast<const typename V::T*>(c.values)) {}
};

template <class F>
decltype(auto) visit_types(const CsrView& c, F&& f) {
  return visit_value_type(c.vtype, [&](auto v) {
    return c.idx64 ? f(v, int64_t{}) : f(v, int32_t{});
  });
}

// Calls f(pa, pb) for every column present in both sorted index ranges [pa, ea) of ia and [pb, eb) of ib.
template <class I, class F>
inline void for_common(const I* ia, int64_t pa, int64_t ea, const I* ib, int64_t pb, int64_t eb, F&& f) {
  while (pa < ea && pb < eb) {
    const I x = ia[pa], y = ib[pb];
    if (x < y) {
      ++pa;
    } else if (y < x) {
      ++pb;
    } else {
      f(pa, pb);
      ++pa;
      ++pb;
    }
  }
}

// sum_t dense[idx[t]] * val[t]: a row of b against a row of a scattered into `dense`.
template <class V, class I>
float gather_dot(const float* dense, const I* idx, const typename V::T* val, int64_t n) {
  int64_t t = 0;
  float s = 0.0f;
#if SR_SIMD_LEVEL == 3
  if constexpr (sizeof(I) == 4) {
    __m512 acc = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
      const __m512i ix = _mm512_loadu_si512(idx + t);
      acc = _mm512_fmadd_ps(_mm512_i32gather_ps(ix, dense, 4), V::load16(val + t), acc);
    }
    s = _mm512_reduce_add_ps(acc);
  }
#elif SR_SIMD_LEVEL == 2
  if constexpr (sizeof(I) == 4) {
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
      const __m256i ix = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + t));
      acc = _mm256_fmadd_ps(_mm256_i32gather_ps(dense, ix, 4), V::load8(val + t), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
  }
#endif
  for (; t < n; ++t) s += dense[idx[t]] * V::load(val, t);
  return s;
}

}  // namespace

void sparse_dot_rows(const CsrView& a, const CsrView& b, int64_t a_begin, int64_t a_end, float* out,
                     float* scratch) {
  visit_types(a, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    const Rows<V, I> A(a), B(b);
    for (int64_t r = a_begin; r < a_end; ++r) {
      float* o = out + (r - a_begin) * b.rows;
      const int64_t lo = A.ptr[r], hi = A.ptr[r + 1];
      if (scratch != nullptr) {
        for (int64_t p = lo; p < hi; ++p) scratch[A.idx[p]] = V::load(A.val, p);
        for (int64_t j = 0; j < b.rows; ++j) {
          o[j] = gather_dot<V, I>(scratch, B.idx + B.ptr[j], B.val + B.ptr[j], B.ptr[j + 1] - B.ptr[j]);
        }
        for (int64_t p = lo; p < hi; ++p) scratch[A.idx[p]] = 0.0f;
      } else {
        for (int64_t j = 0; j < b.rows; ++j) {
          float s = 0.0f;
          for_common(A.idx, lo, hi, B.idx, B.ptr[j], B.ptr[j + 1],
                     [&](int64_t pa, int64_t pb) { s += V::load(A.val, pa) * V::load(B.val, pb); });
          o[j] = s;
        }
      }
    }
  });
}

void sparse_dot_grad_rows(const CsrView& a, const CsrView& b, const float* g, int64_t a_begin, int64_t a_end,
                          float* grad, float* scratch) {
  visit_types(b, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    const Rows<V, I> A(a), B(b);
    for (int64_t r = a_begin; r < a_end; ++r) {
      const float* gr = g + r * b.rows;
      const int64_t lo = A.ptr[r], hi = A.ptr[r + 1];
      if (scratch != nullptr) {
        // scratch = sum_j g[r][j] * b_j (dense), read at a's columns, then zeroed where it was written.
        for (int64_t j = 0; j < b.rows; ++j) {
          const float w = gr[j];
          if (w == 0.0f) continue;
          for (int64_t p = B.ptr[j]; p < B.ptr[j + 1]; ++p) scratch[B.idx[p]] += w * V::load(B.val, p);
        }
        for (int64_t p = lo; p < hi; ++p) grad[p] = scratch[A.idx[p]];
        for (int64_t j = 0; j < b.rows; ++j) {
          if (gr[j] == 0.0f) continue;
          for (int64_t p = B.ptr[j]; p < B.ptr[j + 1]; ++p) scratch[B.idx[p]] = 0.0f;
        }
      } else {
        for (int64_t p = lo; p < hi; ++p) grad[p] = 0.0f;
        for (int64_t j = 0; j < b.rows; ++j) {
          const float w = gr[j];
          for_common(A.idx, lo, hi, B.idx, B.ptr[j], B.ptr[j + 1],
                     [&](int64_t pa, int64_t pb) { grad[pa] += w * V::load(B.val, pb); });
        }
      }
    }
  });
}

void pairwise_dot_rows(const CsrView& a, const CsrView& b, int64_t begin, int64_t end, float* out) {
  visit_types(a, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    const Rows<V, I> A(a), B(b);
    for (int64_t r = begin; r < end; ++r) {
      float s = 0.0f;
      for_common(A.idx, A.ptr[r], A.ptr[r + 1], B.idx, B.ptr[r], B.ptr[r + 1],
                 [&](int64_t pa, int64_t pb) { s += V::load(A.val, pa) * V::load(B.val, pb); });
      out[r] = s;
    }
  });
}

void pairwise_dot_grad_rows(const CsrView& a, const CsrView& b, const float* g, int64_t begin, int64_t end,
                            float* grad) {
  visit_types(b, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    const Rows<V, I> A(a), B(b);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t p = A.ptr[r]; p < A.ptr[r + 1]; ++p) grad[p] = 0.0f;
      const float w = g[r];
      for_common(A.idx, A.ptr[r], A.ptr[r + 1], B.idx, B.ptr[r], B.ptr[r + 1],
                 [&](int64_t pa, int64_t pb) { grad[pa] = w * V::load(B.val, pb); });
    }
  });
}

}  // namespace sr::cpu::SR_SIMD_NS
