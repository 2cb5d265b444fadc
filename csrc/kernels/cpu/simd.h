// Run-time choice between the instruction-set builds of each CPU kernel.
//
// Every file csrc/kernels/cpu/*.cpp is compiled once per SIMD level with that level's compiler flags, its code
// wrapped in `namespace sr::cpu::SR_SIMD_NS` and `SR_SIMD_LEVEL` set to the level's number (0 scalar, 1 NEON,
// 2 AVX2, 3 AVX-512). Kernel code chooses intrinsics with `#if SR_SIMD_LEVEL == ...`; the ATen glue calls
// `SR_SIMD_DISPATCH(fn, args...)`, which calls the build matching `active_simd()`.
#pragma once

#include <string>

namespace sr::cpu {

enum class SimdLevel : int { Scalar = 0, Neon = 1, AVX2 = 2, AVX512 = 3 };

const char* simd_name(SimdLevel level);
// Levels compiled into this build; supported also means the CPU can run it.
bool simd_compiled(SimdLevel level);
bool simd_supported(SimdLevel level);
// The best level this CPU supports among those compiled.
SimdLevel detected_simd();
// The level kernels use now: detected_simd(), or the one forced by set_simd() / SPARSE_RETRIEVAL_SIMD.
SimdLevel active_simd();
// Throws std::invalid_argument when the level is not compiled or the CPU lacks it.
void set_simd(SimdLevel level);
// Parses "scalar", "neon", "avx2" or "avx512"; throws std::invalid_argument otherwise.
SimdLevel simd_from_name(const std::string& name);

}  // namespace sr::cpu

// Declares `decl` in the namespace of every compiled level.
#define SR_SIMD_DECLARE_IN(ns, ...) namespace sr::cpu::ns { __VA_ARGS__; }
#if defined(SR_HAVE_AVX512)
#define SR_SIMD_DECLARE_X86(...) SR_SIMD_DECLARE_IN(avx2, __VA_ARGS__) SR_SIMD_DECLARE_IN(avx512, __VA_ARGS__)
#else
#define SR_SIMD_DECLARE_X86(...)
#endif
#if defined(SR_HAVE_NEON)
#define SR_SIMD_DECLARE_NEON(...) SR_SIMD_DECLARE_IN(neon, __VA_ARGS__)
#else
#define SR_SIMD_DECLARE_NEON(...)
#endif
#define SR_SIMD_DECLARE(...) \
  SR_SIMD_DECLARE_IN(scalar, __VA_ARGS__) SR_SIMD_DECLARE_X86(__VA_ARGS__) SR_SIMD_DECLARE_NEON(__VA_ARGS__)

#if defined(SR_HAVE_AVX512)
#define SR_SIMD_CASES_X86(fn, ...)                             \
  case ::sr::cpu::SimdLevel::AVX512:                           \
    return ::sr::cpu::avx512::fn(__VA_ARGS__);                 \
  case ::sr::cpu::SimdLevel::AVX2:                             \
    return ::sr::cpu::avx2::fn(__VA_ARGS__);
#else
#define SR_SIMD_CASES_X86(fn, ...)
#endif
#if defined(SR_HAVE_NEON)
#define SR_SIMD_CASES_NEON(fn, ...)                            \
  case ::sr::cpu::SimdLevel::Neon:                             \
    return ::sr::cpu::neon::fn(__VA_ARGS__);
#else
#define SR_SIMD_CASES_NEON(fn, ...)
#endif
// Calls the build of `fn` for the active level (the glue only; kernels never dispatch).
#define SR_SIMD_DISPATCH(fn, ...)                              \
  [&]() {                                                      \
    switch (::sr::cpu::active_simd()) {                        \
      SR_SIMD_CASES_X86(fn, __VA_ARGS__)                       \
      SR_SIMD_CASES_NEON(fn, __VA_ARGS__)                      \
      default:                                                 \
        return ::sr::cpu::scalar::fn(__VA_ARGS__);             \
    }                                                          \
  }()
