// Loading float32 / float16 / bfloat16 values as float32, scalar and (where the level has it) 8 or 16 at a time.
// Included by kernel files only: everything lives in the per-level namespace, so no inline function compiled with
// one level's flags can be picked by the linker for another level.
#pragma once

#include <cstdint>
#include <cstring>

#if SR_SIMD_LEVEL >= 2
#include <immintrin.h>
#endif

#include "kernels/cpu/sparse_dot.h"

namespace sr::cpu::SR_SIMD_NS {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
#if SR_SIMD_LEVEL >= 2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float mag = float(man) * (1.0f / 16777216.0f);
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
#endif
}

struct F32 {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
#if SR_SIMD_LEVEL == 3
  static __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
#endif
#if SR_SIMD_LEVEL >= 2
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
#endif
};

struct F16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return half_to_float(p[i]); }
#if SR_SIMD_LEVEL == 3
  static __m512 load16(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
#if SR_SIMD_LEVEL >= 2
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
};

struct BF16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return bits_to_float(uint32_t(p[i]) << 16); }
#if SR_SIMD_LEVEL == 3
  static __m512 load16(const T* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
#endif
#if SR_SIMD_LEVEL >= 2
  static __m256 load8(const T* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
#endif
};

// Calls f(V{}) with the value-type tag of `vtype`.
template <class F>
decltype(auto) visit_value_type(ValueType vtype, F&& f) {
  switch (vtype) {
    case ValueType::F16: return f(F16{});
    case ValueType::BF16: return f(BF16{});
    default: return f(F32{});
  }
}

}  // namespace sr::cpu::SR_SIMD_NS
