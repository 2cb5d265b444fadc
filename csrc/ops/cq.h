// Checks shared by the CPU and CUDA glue of the cq ops: the ones that guard memory safety (the Python layer checks
// everything first, with friendlier messages).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "ops/arg_check.h"
#include "ops/list_check.h"

namespace sr::ops::cq {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType code_dtype(int64_t k) { return k <= 256 ? at::kByte : at::kShort; }

// codebooks (groups, k, g), 1 <= k <= 32768.
inline void check_codebooks(const at::Tensor& books, const char* name) {
  TORCH_CHECK_VALUE(books.dim() == 3, name, " must have shape (groups, centroids, group_size), got ", books.sizes());
  TORCH_CHECK_TYPE(is_float_type(books.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                   books.scalar_type());
  TORCH_CHECK_VALUE(books.size(0) > 0 && books.size(1) > 0 && books.size(2) > 0, name, " must not be empty");
  TORCH_CHECK_VALUE(books.size(1) <= 32768, name, " has ", books.size(1), " centroids, at most 32768 supported");
}

// Encoding compares distances and attention multiplies every centroid by its bucket's weight (unused ones by 0):
// a NaN or infinite centroid would make codes arbitrary and outputs NaN. Once per codebooks tensor version.
inline void check_finite_books(std::initializer_list<at::Tensor> books, const char* names) {
  check_once("cq codebooks finite", books, {}, [&] {
    for (const auto& b : books) {
      TORCH_CHECK_VALUE(at::isfinite(b).all().item<bool>(), names, ": centroids must be finite");
    }
  });
}

// Codes index centroids: their dtype must match the codebook size and, where the dtype can hold larger values,
// every code must be below k.
inline void check_codes(const at::Tensor& codes, int64_t k, const char* name) {
  TORCH_CHECK_TYPE(codes.scalar_type() == code_dtype(k), name, " must be ", code_dtype(k), " for ", k,
                   " centroids, got ", codes.scalar_type());
  const int64_t dtype_max = codes.scalar_type() == at::kByte ? 256 : 32768;
  if (codes.numel() > 0 && (k < dtype_max || codes.scalar_type() == at::kShort)) {
    auto [lo, hi] = at::aminmax(codes);
    TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < k, name, " must lie in [0, ", k,
                      "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

// Checks an encode call and allocates its codes (..., groups).
inline at::Tensor checked_encode_output(const at::Tensor& x, const at::Tensor& codebooks) {
  require_defined(x, "x", codebooks, "codebooks");
  check_codebooks(codebooks, "codebooks");
  check_finite_books({codebooks}, "codebooks");
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == codebooks.device(), "x is on ", x.device(), ", codebooks on ", codebooks.device());
  const int64_t groups = codebooks.size(0), g = codebooks.size(2);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == groups * g, "x must have groups * group_size = ", groups * g,
                    " channels in its last dimension, got shape ", x.sizes());
  auto shape = x.sizes().vec();
  shape.back() = groups;
  return at::empty(shape, x.options().dtype(code_dtype(codebooks.size(1))));
}

// Checks a decode call (code dtype and range included) and allocates its output (..., groups * g).
inline at::Tensor checked_decode_output(const at::Tensor& codes, const at::Tensor& codebooks) {
  require_defined(codes, "codes", codebooks, "codebooks");
  check_codebooks(codebooks, "codebooks");
  TORCH_CHECK_VALUE(codes.device() == codebooks.device(), "codes are on ", codes.device(), ", codebooks on ",
                    codebooks.device());
  const int64_t groups = codebooks.size(0), g = codebooks.size(2);
  TORCH_CHECK_VALUE(codes.dim() >= 1 && codes.size(-1) == groups, "codes must have ", groups,
                    " groups in their last dimension, got shape ", codes.sizes());
  check_codes(codes, codebooks.size(1), "codes");
  auto shape = codes.sizes().vec();
  shape.back() = groups * g;
  return at::empty(shape, codebooks.options());
}

// Sizes of one cq_attention call, after its checks.
struct AttentionSizes {
  int64_t B, Hq, Tq, D, Hkv, T, G, K, g, W;
  float scale;
};

inline AttentionSizes check_attention(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& v_codes,
                                      const at::Tensor& k_books, const at::Tensor& v_books,
                                      const std::optional<at::Tensor>& k_recent,
                                      const std::optional<at::Tensor>& v_recent,
                                      const std::optional<at::Tensor>& lengths, std::optional<double> scale,
                                      const std::optional<at::Tensor>& starts) {
  require_defined(q, "q", k_codes, "k_codes", v_codes, "v_codes", k_books, "k_codebooks", v_books, "v_codebooks");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must have shape (batch, query_heads, query_tokens, head_dim), got ", q.sizes());
  TORCH_CHECK_TYPE(is_float_type(q.scalar_type()), "q must be float32, float16 or bfloat16");
  check_codebooks(k_books, "k_codebooks");
  check_codebooks(v_books, "v_codebooks");
  check_finite_books({k_books, v_books}, "k_codebooks and v_codebooks");
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), "scale must be finite, got ", scale.value_or(0.0));
  TORCH_CHECK_VALUE(k_books.sizes() == v_books.sizes(), "k_codebooks ", k_books.sizes(), " and v_codebooks ",
                    v_books.sizes(), " must have the same shape");
  AttentionSizes s{};
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.Tq = q.size(2);
  s.D = q.size(3);
  s.K = k_books.size(1);
  s.g = k_books.size(2);
  TORCH_CHECK_VALUE(k_codes.dim() == 4 && k_codes.sizes() == v_codes.sizes(),
                    "k_codes and v_codes must have the same shape (batch, kv_heads, tokens, groups), got ",
                    k_codes.sizes(), " and ", v_codes.sizes());
  s.Hkv = k_codes.size(1);
  s.T = k_codes.size(2);
  s.G = k_codes.size(3);
  TORCH_CHECK_VALUE(k_codes.size(0) == s.B, "k_codes batch ", k_codes.size(0), " != q batch ", s.B);
  TORCH_CHECK_VALUE(s.Hkv > 0 && s.Hq % s.Hkv == 0, "query heads ", s.Hq, " must be a multiple of kv heads ", s.Hkv);
  TORCH_CHECK_VALUE(s.G * s.g == s.D, "codes have ", s.G, " groups of ", s.g, " channels, but head_dim is ", s.D);
  TORCH_CHECK_VALUE(k_books.size(0) == s.Hkv * s.G, "codebooks cover ", k_books.size(0), " groups, expected kv_heads * groups = ",
                    s.Hkv * s.G);
  check_codes(k_codes, s.K, "k_codes");
  check_codes(v_codes, s.K, "v_codes");
  TORCH_CHECK_VALUE(k_recent.has_value() == v_recent.has_value(), "give both k_recent and v_recent or neither");
  s.W = 0;
  if (k_recent.has_value()) {
    TORCH_CHECK_TYPE(is_float_type(k_recent->scalar_type()) && is_float_type(v_recent->scalar_type()),
                     "k_recent and v_recent must be float32, float16 or bfloat16");
    TORCH_CHECK_VALUE(k_recent->dim() == 4 && k_recent->size(0) == s.B && k_recent->size(1) == s.Hkv &&
                          k_recent->size(3) == s.D && k_recent->sizes() == v_recent->sizes(),
                      "k_recent and v_recent must both have shape (", s.B, ", ", s.Hkv, ", window, ", s.D, "), got ",
                      k_recent->sizes(), " and ", v_recent->sizes());
    s.W = k_recent->size(2);
  }
  if (lengths.has_value()) {
    TORCH_CHECK_TYPE(lengths->scalar_type() == at::kLong || lengths->scalar_type() == at::kInt,
                     "lengths must be int64 or int32");
    TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->size(0) == s.B, "lengths must have shape (", s.B, "), got ",
                      lengths->sizes());
    if (s.B > 0) {
      auto [lo, hi] = at::aminmax(*lengths);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= s.T, "lengths must lie in [0, ", s.T,
                        "], got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
  }
  if (starts.has_value()) {
    TORCH_CHECK_TYPE(starts->scalar_type() == at::kLong || starts->scalar_type() == at::kInt,
                     "starts must be int64 or int32");
    TORCH_CHECK_VALUE(starts->dim() == 2 && starts->size(0) == s.B && starts->size(1) == s.Tq,
                      "starts must have shape (", s.B, ", ", s.Tq, "), got ", starts->sizes());
    if (starts->numel() > 0) {
      auto [lo, hi] = at::aminmax(*starts);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= s.T + s.W, "starts must lie in [0, ",
                        s.T + s.W, "], got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
  }
  s.scale = scale.has_value() ? static_cast<float>(*scale) : 1.f / std::sqrt(static_cast<float>(s.D));
  return s;
}

}  // namespace sr::ops::cq
