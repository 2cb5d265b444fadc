// Top-k by threshold filtering. The first elements of a row fill a buffer; from then on only elements better
// than the current k-th best (compared as floats, one SIMD compare per vector) are appended. When the buffer is
// full it is cut back to its best k with nth_element, which raises the threshold. On random data only about
// k * log(n / k) elements ever pass, so the scan runs at the speed of loading and comparing.
#include "kernels/cpu/topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#if SR_SIMD_LEVEL >= 2
#include <immintrin.h>
#endif

namespace sr::cpu::SR_SIMD_NS {
namespace {

struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_float(F16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1Fu;
  const uint32_t mant = v.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// Order-preserving code of a float: NaN (any sign or payload) above +inf, -0 equal to +0. Smallest-first
// selection inverts it, which keeps NaN worst there too.
inline uint32_t order_code(float v, bool largest) {
  uint32_t c = 0xFFFFFFFFu;
  if (v == v) {
    v += 0.0f;  // -0 -> +0
    uint32_t b;
    std::memcpy(&b, &v, 4);
    c = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return largest ? c : ~c;
}

inline float code_value(uint32_t c, bool largest) {
  if (!largest) c = ~c;
  return bits_to_float((c & 0x80000000u) ? (c & 0x7FFFFFFFu) : ~c);
}

inline uint64_t make_key(float v, int64_t i, bool largest) {
  return (static_cast<uint64_t>(order_code(v, largest)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}

// Which elements may enter the buffer, given the current k-th best value t.
enum class Pass { AboveOrNaN, Below, NotNaN };

template <Pass P>
inline bool passes(float v, float t) {
  if constexpr (P == Pass::AboveOrNaN) return !(v <= t);
  if constexpr (P == Pass::Below) return v < t;
  return v == v;
}

#if SR_SIMD_LEVEL == 3
constexpr int W = 16;
using Vec = __m512;
inline Vec splat(float t) { return _mm512_set1_ps(t); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec load(const BF16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <Pass P>
inline uint32_t pass_mask(Vec v, Vec t) {
  if constexpr (P == Pass::AboveOrNaN) return _mm512_cmp_ps_mask(v, t, _CMP_NLE_UQ);
  if constexpr (P == Pass::Below) return _mm512_cmp_ps_mask(v, t, _CMP_LT_OQ);
  return _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
}
// Appends the keys of the lanes in mask (elements i, i+1, ...) to buf; may write up to W entries.
inline int64_t push(uint32_t mask, Vec v, int64_t i, bool largest, uint64_t* buf) {
  const __m512i all = _mm512_set1_epi32(-1);
  const __m512i b = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));
  __m512i code = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(INT32_MIN)));
  code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), all);
  if (!largest) code = _mm512_xor_si512(code, all);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int32_t first_low = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
  const __m512i low = _mm512_sub_epi32(_mm512_set1_epi32(first_low), lane);
  const __mmask16 m = static_cast<__mmask16>(mask);
  const __m512i c = _mm512_maskz_compress_epi32(m, code);
  const __m512i l = _mm512_maskz_compress_epi32(m, low);
  const auto join = [](__m256i hi32, __m256i lo32) {
    return _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(hi32), 32), _mm512_cvtepu32_epi64(lo32));
  };
  const int count = __builtin_popcount(mask);
  _mm512_storeu_si512(buf, join(_mm512_castsi512_si256(c), _mm512_castsi512_si256(l)));
  if (count > 8) _mm512_storeu_si512(buf + 8, join(_mm512_extracti64x4_epi64(c, 1), _mm512_extracti64x4_epi64(l, 1)));
  return count;
}
#else
#if SR_SIMD_LEVEL == 2
constexpr int W = 8;
using Vec = __m256;
inline Vec splat(float t) { return _mm256_set1_ps(t); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec load(const BF16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store(float* lanes, Vec v) { _mm256_storeu_ps(lanes, v); }
template <Pass P>
inline uint32_t pass_mask(Vec v, Vec t) {
  if constexpr (P == Pass::AboveOrNaN) return _mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_NLE_UQ));
  if constexpr (P == Pass::Below) return _mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_LT_OQ));
  return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
}
#else  // portable: one element at a time, the same algorithm
constexpr int W = 1;
using Vec = float;
inline Vec splat(float t) { return t; }
template <class T>
inline Vec load(const T* p) { return to_float(*p); }
inline void store(float* lanes, Vec v) { lanes[0] = v; }
template <Pass P>
inline uint32_t pass_mask(Vec v, Vec t) { return passes<P>(v, t) ? 1u : 0u; }
#endif
inline int64_t push(uint32_t mask, Vec v, int64_t i, bool largest, uint64_t* buf) {
  float lanes[W];
  store(lanes, v);
  int64_t count = 0;
  while (mask) {
    const int j = __builtin_ctz(mask);
    mask &= mask - 1;
    buf[count++] = make_key(lanes[j], i + j, largest);
  }
  return count;
}
#endif

constexpr uint32_t kAllLanes = static_cast<uint32_t>((uint64_t{1} << W) - 1);
constexpr int kBlock = 4 * W;  // elements compared per loop step

// Scans row[i, hi) appending passing elements until the end or until the buffer holds more than cap.
template <Pass P, class T>
int64_t scan(const T* row, int64_t i, int64_t hi, float thr, bool largest, uint64_t* buf, int64_t& count,
             int64_t cap) {
  const Vec t = splat(thr);
  while (i + kBlock <= hi && count <= cap) {
    const Vec v0 = load(row + i), v1 = load(row + i + W), v2 = load(row + i + 2 * W), v3 = load(row + i + 3 * W);
    const uint32_t m0 = pass_mask<P>(v0, t), m1 = pass_mask<P>(v1, t), m2 = pass_mask<P>(v2, t),
                   m3 = pass_mask<P>(v3, t);
    if (m0 | m1 | m2 | m3) {
      if (m0) count += push(m0, v0, i, largest, buf + count);
      if (m1) count += push(m1, v1, i + W, largest, buf + count);
      if (m2) count += push(m2, v2, i + 2 * W, largest, buf + count);
      if (m3) count += push(m3, v3, i + 3 * W, largest, buf + count);
    }
    i += kBlock;
  }
  for (; i < hi && count <= cap; ++i) {
    const float v = to_float(row[i]);
    if (passes<P>(v, thr)) buf[count++] = make_key(v, i, largest);
  }
  return i;
}

// Large k: a starting threshold from a sample. Without one the threshold only rises as the scan goes and about
// k * ln(n / k) elements pass, so the buffer cuts dominate. The 8th best of every (k / 4)-th element is passed
// by about 8 * k / 4 = 2k elements of the row. Returns false where sampling does not pay off.
constexpr int64_t kMinSampleK = 128;
template <class T>
bool sample_threshold(const T* row, int64_t lo, int64_t hi, int64_t k, bool largest, uint64_t* scratch,
                      float& thr) {
  constexpr int64_t kRank = 8;
  const int64_t stride = k / 4;
  // Measured: sampling 4n / k elements costs about as much as cutting 6k ln(n / k) survivors.
  const double n = static_cast<double>(hi - lo);
  if (k < kMinSampleK || n < 64.0 * k || n > 1.5 * k * k * std::log(n / k)) return false;
  int64_t s = 0;
  for (int64_t i = lo; i < hi; i += stride) scratch[s++] = make_key(to_float(row[i]), i, largest);
  std::nth_element(scratch, scratch + kRank - 1, scratch + s, std::greater<uint64_t>());
  thr = code_value(static_cast<uint32_t>(scratch[kRank - 1] >> 32), largest);
  return true;
}

template <class T>
int64_t select(const T* row, int64_t lo, int64_t hi, int64_t k, bool largest, uint64_t* keys, bool sample) {
  const int64_t n = hi - lo;
  if (k <= 0 || n <= 0) return 0;
  const int64_t cap = k + std::max<int64_t>(k, 256);
  thread_local std::vector<uint64_t> storage;
  // Room for one more block of survivors past cap plus the full-vector store of the last one, or the sample
  // (taken only for k >= kMinSampleK: O(n / k) keys, never O(n)).
  const int64_t sample_keys = sample && k >= kMinSampleK ? n / (k / 4) + 1 : 0;
  const size_t need = static_cast<size_t>(std::max(cap + kBlock + W, sample_keys));
  if (storage.size() < need) storage.resize(need);
  uint64_t* buf = storage.data();

  int64_t count = 0, i = lo;
  float thr = 0.0f;
  const bool sampled = sample && sample_threshold(row, lo, hi, k, largest, buf, thr);
  if (!sampled) {  // the first elements enter unconditionally and set the first threshold
    const int64_t first = lo + std::min(n, cap);
    for (; i + W <= first; i += W) count += push(kAllLanes, load(row + i), i, largest, buf + count);
    for (; i < first; ++i) buf[count++] = make_key(to_float(row[i]), i, largest);
  }
  while (true) {
    if (count > k) {
      std::nth_element(buf, buf + k - 1, buf + count, std::greater<uint64_t>());
      count = k;
      thr = code_value(static_cast<uint32_t>(buf[k - 1] >> 32), largest);
    }
    if (i >= hi) break;
    if (largest) {
      if (thr != thr) break;  // k NaNs seen (or the sample's threshold is NaN): nothing later can beat them
      i = scan<Pass::AboveOrNaN>(row, i, hi, thr, largest, buf, count, cap);
    } else if (thr != thr) {
      i = scan<Pass::NotNaN>(row, i, hi, thr, largest, buf, count, cap);
    } else {
      i = scan<Pass::Below>(row, i, hi, thr, largest, buf, count, cap);
    }
  }
  // Fewer than k elements beat the sampled threshold (unlucky sample, or many ties): start again without it.
  if (sampled && count < k) return select(row, lo, hi, k, largest, keys, false);
  std::copy(buf, buf + count, keys);
  if (storage.size() > (size_t{1} << 22)) storage = std::vector<uint64_t>();  // don't pin huge buffers per thread
  return count;
}

template <class T>
void emit(const uint64_t* keys, int64_t k, const T* row, T* values, int64_t* indices) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t idx = topk_key_index(keys[j]);
    indices[j] = idx;
    values[j] = row[idx];
  }
}

}  // namespace

int64_t topk_select(const void* row, TopkDtype dtype, int64_t lo, int64_t hi, int64_t k, bool largest,
                    uint64_t* keys) {
  switch (dtype) {
    case TopkDtype::Float16:
      return select(static_cast<const F16*>(row), lo, hi, k, largest, keys, true);
    case TopkDtype::BFloat16:
      return select(static_cast<const BF16*>(row), lo, hi, k, largest, keys, true);
    default:
      return select(static_cast<const float*>(row), lo, hi, k, largest, keys, true);
  }
}

void topk_emit(uint64_t* keys, int64_t count, int64_t k, bool sorted, const void* row, TopkDtype dtype,
               void* values, int64_t* indices) {
  if (k <= 0) return;
  if (count > k) std::nth_element(keys, keys + k - 1, keys + count, std::greater<uint64_t>());
  if (sorted) std::sort(keys, keys + k, std::greater<uint64_t>());
  if (dtype == TopkDtype::Float32) {
    emit(keys, k, static_cast<const float*>(row), static_cast<float*>(values), indices);
  } else {  // both half types: copy the 16-bit patterns
    emit(keys, k, static_cast<const uint16_t*>(row), static_cast<uint16_t*>(values), indices);
  }
}

}  // namespace sr::cpu::SR_SIMD_NS
