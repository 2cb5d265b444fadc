#include "kernels/cpu/cq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if SR_SIMD_LEVEL >= 2
#include <immintrin.h>
#endif

namespace sr::cpu::SR_SIMD_NS {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- nearest centroid -----------------------------------------------------------------------------------------
// Every level keeps, per lane, the first centroid with the smallest distance (strict <), then takes the lowest
// code among the lanes holding the minimum: that is the first minimum overall, as argmin in the reference.

#if SR_SIMD_LEVEL == 3
int64_t nearest(const float* xv, const float* bt, int64_t g, int64_t kp) {
  __m512 best = _mm512_set1_ps(kInf);
  __m512i best_idx = _mm512_setzero_si512();
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t c0 = 0; c0 < kp; c0 += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t e = 0; e < g; ++e) {
      __m512 diff = _mm512_sub_ps(_mm512_set1_ps(xv[e]), _mm512_loadu_ps(bt + e * kp + c0));
      acc = _mm512_fmadd_ps(diff, diff, acc);
    }
    __mmask16 lt = _mm512_cmp_ps_mask(acc, best, _CMP_LT_OQ);
    best = _mm512_mask_mov_ps(best, lt, acc);
    best_idx = _mm512_mask_mov_epi32(best_idx, lt, idx);
    idx = _mm512_add_epi32(idx, step);
  }
  float m = _mm512_reduce_min_ps(best);
  __mmask16 eq = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(eq, best_idx);
}
#elif SR_SIMD_LEVEL == 2
int64_t nearest(const float* xv, const float* bt, int64_t g, int64_t kp) {
  __m256 best = _mm256_set1_ps(kInf);
  __m256i best_idx = _mm256_setzero_si256();
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t c0 = 0; c0 < kp; c0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t e = 0; e < g; ++e) {
      __m256 diff = _mm256_sub_ps(_mm256_set1_ps(xv[e]), _mm256_loadu_ps(bt + e * kp + c0));
      acc = _mm256_fmadd_ps(diff, diff, acc);
    }
    __m256 lt = _mm256_cmp_ps(acc, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, acc, lt);
    best_idx = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(best_idx), _mm256_castsi256_ps(idx), lt));
    idx = _mm256_add_epi32(idx, step);
  }
  alignas(32) float bv[8];
  alignas(32) int32_t bi[8];
  _mm256_store_ps(bv, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bi), best_idx);
  int64_t out = bi[0];
  float m = bv[0];
  for (int l = 1; l < 8; ++l) {
    if (bv[l] < m || (bv[l] == m && bi[l] < out)) {
      m = bv[l];
      out = bi[l];
    }
  }
  return out;
}
#else
int64_t nearest(const float* xv, const float* bt, int64_t g, int64_t kp) {
  float best = kInf;
  int64_t out = 0;
  for (int64_t c = 0; c < kp; ++c) {
    float dist = 0.f;
    for (int64_t e = 0; e < g; ++e) {
      float diff = xv[e] - bt[e * kp + c];
      dist += diff * diff;
    }
    if (dist < best) {
      best = dist;
      out = c;
    }
  }
  return out;
}
#endif

// ---- exp and softmax ------------------------------------------------------------------------------------------
// p[i] = exp(s[i] - m) in place; returns the sum. Vector levels use a Cephes-style polynomial (about 1 ulp).

#if SR_SIMD_LEVEL >= 2
#if SR_SIMD_LEVEL == 3
using VecF = __m512;
constexpr int kLanes = 16;
inline VecF vset(float v) { return _mm512_set1_ps(v); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vmin(VecF a, VecF b) { return _mm512_min_ps(a, b); }
inline VecF vmax(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF vround(VecF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF vpow2i(VecF n) {
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_castsi512_ps(e);
}
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
#else
using VecF = __m256;
constexpr int kLanes = 8;
inline VecF vset(float v) { return _mm256_set1_ps(v); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vmin(VecF a, VecF b) { return _mm256_min_ps(a, b); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF vround(VecF a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF vpow2i(VecF n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(e);
}
inline float vsum(VecF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline VecF vexp(VecF x) {
  x = vmax(vmin(x, vset(88.3762626647949f)), vset(-87.3365447504f));
  VecF n = vround(vmul(x, vset(1.44269504088896341f)));
  x = vfma(n, vset(-0.693359375f), x);
  x = vfma(n, vset(2.12194440e-4f), x);
  VecF y = vset(1.9875691500e-4f);
  y = vfma(y, x, vset(1.3981999507e-3f));
  y = vfma(y, x, vset(8.3334519073e-3f));
  y = vfma(y, x, vset(4.1665795894e-2f));
  y = vfma(y, x, vset(1.6666665459e-1f));
  y = vfma(y, x, vset(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), vadd(x, vset(1.f)));
  return vmul(y, vpow2i(n));
}

float dot(const float* a, const float* b, int64_t n) {
  VecF acc0 = vset(0.f), acc1 = vset(0.f);
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = vfma(vload(a + i), vload(b + i), acc0);
    acc1 = vfma(vload(a + i + kLanes), vload(b + i + kLanes), acc1);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 = vfma(vload(a + i), vload(b + i), acc0);
  float sum = vsum(vadd(acc0, acc1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

float exp_shift_sum(float* s, int64_t n, float m) {
  VecF acc = vset(0.f), vm = vset(m);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    VecF p = vexp(vsub(vload(s + i), vm));
    vstore(s + i, p);
    acc = vadd(acc, p);
  }
  float sum = vsum(acc);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}
#else
float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

float exp_shift_sum(float* s, int64_t n, float m) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}
#endif

// ---- attention from codes -------------------------------------------------------------------------------------
// The R query rows of a head are interleaved in the tables and buckets ([group][code][row]), so one token's
// lookup or bucket update for all rows is one short vector operation; RC is R when it is 1, 2, 3, 4 or 8
// (known to the compiler), 0 otherwise.

// scores[r * stride + t] = sum_j table[(j * K + code_tj) * R + r] for t < n_tokens.
template <typename C, int RC>
void coded_scores(const C* codes, int64_t n_tokens, int64_t G, int64_t K, int64_t R, const float* table,
                  float* scores, int64_t stride) {
  const int64_t RR = RC > 0 ? RC : R;
  constexpr int64_t kBlock = 4;  // independent sums keep the lookups from waiting on each other
  int64_t t0 = 0;
  for (; t0 + kBlock <= n_tokens; t0 += kBlock) {
    float s[kBlock][RC > 0 ? RC : 16] = {};
    if (RC == 0 && RR > 16) break;  // generic rows beyond 16 take the token-at-a-time loop
    const C* code = codes + t0 * G;
    for (int64_t j = 0; j < G; ++j) {
      const float* tj = table + j * K * RR;
      for (int64_t u = 0; u < kBlock; ++u) {
        const float* row = tj + static_cast<int64_t>(code[u * G + j]) * RR;
        for (int64_t r = 0; r < RR; ++r) s[u][r] += row[r];
      }
    }
    for (int64_t u = 0; u < kBlock; ++u) {
      for (int64_t r = 0; r < RR; ++r) scores[r * stride + t0 + u] = s[u][r];
    }
  }
  for (; t0 < n_tokens; ++t0) {
    for (int64_t r = 0; r < RR; ++r) {
      float s = 0.f;
      for (int64_t j = 0; j < G; ++j) s += table[(j * K + static_cast<int64_t>(codes[t0 * G + j])) * RR + r];
      scores[r * stride + t0] = s;
    }
  }
}

// buckets[(j * K + code_tj) * R + r] += p[t * R + r] for t < n_tokens.
template <typename C, int RC>
void scatter_weights(const C* codes, int64_t n_tokens, int64_t G, int64_t K, int64_t R, const float* p,
                     float* buckets) {
  const int64_t RR = RC > 0 ? RC : R;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const C* code = codes + t * G;
    const float* pt = p + t * RR;
    for (int64_t j = 0; j < G; ++j) {
      float* b = buckets + (j * K + static_cast<int64_t>(code[j])) * RR;
      for (int64_t r = 0; r < RR; ++r) b[r] += pt[r];
    }
  }
}

template <typename C, int RC>
void attention_impl(const CqAttentionHead& a) {
  const int64_t R = a.rep * a.tq, D = a.d, g = a.g, G = D / g, K = a.k, T = a.t_coded, W = a.w;
  const C* kc = static_cast<const C*>(a.k_codes);
  const C* vc = static_cast<const C*>(a.v_codes);

  // Query t of a head sits at position T + W - tq + t: it sees coded tokens [c0, min(length, position + 1)) and
  // window slots [w0, W - tq + t], where starts[t] (padding on the left, a sliding window) sets c0 and w0.
  std::vector<int64_t> c0(R), n_coded(R), w0(R), n_win(R);
  int64_t t_max = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = r % a.tq, qpos = T + W - a.tq + t, start = a.starts != nullptr ? a.starts[t] : 0;
    n_coded[r] = std::clamp<int64_t>(std::min(a.length, qpos + 1), 0, T);
    n_win[r] = std::clamp<int64_t>(W - a.tq + t + 1, 0, W);
    c0[r] = std::clamp<int64_t>(start, 0, n_coded[r]);
    w0[r] = std::clamp<int64_t>(start - T, 0, n_win[r]);
    t_max = std::max(t_max, n_coded[r]);
  }
  const int64_t stride = t_max + W;  // one row of scores: coded tokens, then window slots

  // Per-row tables q_r[group j] . key centroid c * scale, built by contiguous multiply-adds over the transposed
  // books (G, g, K), then interleaved: lut[(j * K + c) * R + r].
  thread_local std::vector<float> row_table, lut, acc, weights, scores;
  row_table.resize(K);
  lut.resize(G * K * R);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      std::fill(row_table.begin(), row_table.end(), 0.f);
      for (int64_t e = 0; e < g; ++e) {
        const float qe = a.q[r * D + j * g + e] * a.scale;
        const float* book = a.k_books_t + (j * g + e) * K;
        for (int64_t c = 0; c < K; ++c) row_table[c] += qe * book[c];
      }
      for (int64_t c = 0; c < K; ++c) lut[(j * K + c) * R + r] = row_table[c];
    }
  }
  scores.resize(R * stride);
  coded_scores<C, RC>(kc, t_max, G, K, R, lut.data(), scores.data(), stride);
  for (int64_t r = 0; r < R; ++r) {
    const float* qr = a.q + r * D;
    for (int64_t w = w0[r]; w < n_win[r]; ++w) {
      scores[r * stride + t_max + w] = dot(qr, a.k_recent + w * D, D) * a.scale;
    }
  }

  // Softmax per row over the visible tokens (the only ones read below).
  std::vector<float> total(R, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores.data() + r * stride;
    float m = -kInf;
    for (int64_t t = c0[r]; t < n_coded[r]; ++t) m = std::max(m, sr[t]);
    for (int64_t w = w0[r]; w < n_win[r]; ++w) m = std::max(m, sr[t_max + w]);
    if (n_coded[r] - c0[r] + n_win[r] - w0[r] == 0) continue;
    total[r] = exp_shift_sum(sr + c0[r], n_coded[r] - c0[r], m) +
               exp_shift_sum(sr + t_max + w0[r], n_win[r] - w0[r], m);
  }

  // Values: add each token's weight to its (group, code) bucket, then multiply the buckets by the codebook once.
  weights.resize(t_max * R);
  for (int64_t r = 0; r < R; ++r) {
    const float* sr = scores.data() + r * stride;
    for (int64_t t = 0; t < t_max; ++t) weights[t * R + r] = t >= c0[r] && t < n_coded[r] ? sr[t] : 0.f;
  }
  acc.assign(G * K * R, 0.f);
  scatter_weights<C, RC>(vc, t_max, G, K, R, weights.data(), acc.data());
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      for (int64_t c = 0; c < K; ++c) row_table[c] = acc[(j * K + c) * R + r];
      for (int64_t e = 0; e < g; ++e) a.out[r * D + j * g + e] = dot(row_table.data(), a.v_books_t + (j * g + e) * K, K);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* o = a.out + r * D;
    const float* pr = scores.data() + r * stride + t_max;
    for (int64_t w = w0[r]; w < n_win[r]; ++w) {
      const float* vr = a.v_recent + w * D;
      for (int64_t e = 0; e < D; ++e) o[e] += pr[w] * vr[e];
    }
    // No visible token: zeros, as in the reference.
    const float inv = total[r] > 0.f ? 1.f / total[r] : 0.f;
    for (int64_t e = 0; e < D; ++e) o[e] *= inv;
  }
}

template <typename C>
void encode_impl(const float* x, int64_t rows, int64_t groups, int64_t g, int64_t kp, const float* bt, C* codes) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < groups; ++j) {
      codes[i * groups + j] = static_cast<C>(nearest(x + (i * groups + j) * g, bt + j * g * kp, g, kp));
    }
  }
}

template <typename C>
void decode_impl(const C* codes, int64_t rows, int64_t groups, int64_t g, int64_t k, const char* books,
                 int elem_bytes, char* out) {
  const int64_t bytes = g * elem_bytes;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t c = static_cast<int64_t>(codes[i * groups + j]);
      std::memcpy(out + (i * groups + j) * bytes, books + (j * k + c) * bytes, bytes);
    }
  }
}

template <typename C>
void attention_rows(const CqAttentionHead& a) {
  switch (a.rep * a.tq) {
    case 1: return attention_impl<C, 1>(a);
    case 2: return attention_impl<C, 2>(a);
    case 3: return attention_impl<C, 3>(a);  // 9 query heads over 3 KV heads (SmolLM2)
    case 4: return attention_impl<C, 4>(a);
    case 8: return attention_impl<C, 8>(a);
    default: return attention_impl<C, 0>(a);
  }
}

}  // namespace

void cq_encode_rows(const float* x, int64_t rows, int64_t groups, int64_t g, int64_t k_padded, const float* books_t,
                    void* codes, int code_bytes) {
  if (code_bytes == 1) {
    encode_impl(x, rows, groups, g, k_padded, books_t, static_cast<uint8_t*>(codes));
  } else {
    encode_impl(x, rows, groups, g, k_padded, books_t, static_cast<int16_t*>(codes));
  }
}

void cq_decode_rows(const void* codes, int code_bytes, int64_t rows, int64_t groups, int64_t g, int64_t k,
                    const void* books, int elem_bytes, void* out) {
  const char* b = static_cast<const char*>(books);
  char* o = static_cast<char*>(out);
  if (code_bytes == 1) {
    decode_impl(static_cast<const uint8_t*>(codes), rows, groups, g, k, b, elem_bytes, o);
  } else {
    decode_impl(static_cast<const int16_t*>(codes), rows, groups, g, k, b, elem_bytes, o);
  }
}

void cq_attention_head(const CqAttentionHead& a) {
  if (a.code_bytes == 1) {
    attention_rows<uint8_t>(a);
  } else {
    attention_rows<int16_t>(a);
  }
}

}  // namespace sr::cpu::SR_SIMD_NS
