#include "kernels/cpu/simd.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace sr::cpu {
namespace {

bool cpu_has(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return true;
#if defined(__x86_64__) || defined(__i386__)
    case SimdLevel::AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    case SimdLevel::AVX512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#endif
#if defined(__aarch64__)
    case SimdLevel::Neon:
      return true;  // Advanced SIMD is mandatory on AArch64.
#endif
    default:
      return false;
  }
}

SimdLevel parse_level(const std::string& name) {
  for (int i = 0; i <= 3; ++i) {
    if (name == simd_name(static_cast<SimdLevel>(i))) return static_cast<SimdLevel>(i);
  }
  throw std::invalid_argument("unknown SIMD level '" + name + "' (expected scalar, neon, avx2 or avx512)");
}

SimdLevel initial_level() {
  const char* env = std::getenv("SPARSE_RETRIEVAL_SIMD");
  if (env == nullptr || *env == '\0') return detected_simd();
  SimdLevel level;
  try {
    level = parse_level(env);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("SPARSE_RETRIEVAL_SIMD=") + env + ": " + e.what());
  }
  if (!simd_supported(level)) {
    throw std::invalid_argument(std::string("SPARSE_RETRIEVAL_SIMD=") + env +
                                " is not compiled into this build or not supported by this CPU");
  }
  return level;
}

// -1 until the first use reads SPARSE_RETRIEVAL_SIMD, so that set_simd() also works when the variable is bad.
std::atomic<int> g_active{-1};

}  // namespace

const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Neon: return "neon";
    case SimdLevel::AVX2: return "avx2";
    case SimdLevel::AVX512: return "avx512";
  }
  return "unknown";
}

bool simd_compiled(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return true;
#if defined(SR_HAVE_NEON)
    case SimdLevel::Neon: return true;
#endif
#if defined(SR_HAVE_AVX512)
    case SimdLevel::AVX2: return true;
    case SimdLevel::AVX512: return true;
#endif
    default: return false;
  }
}

bool simd_supported(SimdLevel level) { return simd_compiled(level) && cpu_has(level); }

SimdLevel detected_simd() {
  for (int i = 3; i > 0; --i) {
    if (simd_supported(static_cast<SimdLevel>(i))) return static_cast<SimdLevel>(i);
  }
  return SimdLevel::Scalar;
}

SimdLevel active_simd() {
  int level = g_active.load(std::memory_order_relaxed);
  if (level < 0) {
    int unset = -1;
    g_active.compare_exchange_strong(unset, static_cast<int>(initial_level()), std::memory_order_relaxed);
    level = g_active.load(std::memory_order_relaxed);
  }
  return static_cast<SimdLevel>(level);
}

void set_simd(SimdLevel level) {
  if (!simd_supported(level)) {
    throw std::invalid_argument(std::string("SIMD level '") + simd_name(level) +
                                "' is not compiled into this build or not supported by this CPU");
  }
  g_active.store(static_cast<int>(level), std::memory_order_relaxed);
}

SimdLevel simd_from_name(const std::string& name) { return parse_level(name); }

}  // namespace sr::cpu
