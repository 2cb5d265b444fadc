// Sparse x sparse dot products over CSR batches (torch-free). Both batches share one index type and one value
// type (the Python layer promotes them); products accumulate in float32.
#pragma once

#include <cstdint>

#include "kernels/cpu/simd.h"

namespace sr::cpu {

enum class ValueType : int { F32 = 0, F16 = 1, BF16 = 2 };

// A CSR batch: rows + 1 row pointers, column indices (int32 or int64) and values of `vtype`.
struct CsrView {
  const int64_t* indptr;
  const void* indices;
  const void* values;
  int64_t rows;
  bool idx64;
  ValueType vtype;
};

// Above this dimension the all-pairs kernels merge sorted rows instead of scattering a row into a dense scratch
// vector of `dim` floats per thread.
constexpr int64_t kDenseScratchMaxDim = int64_t(1) << 22;

}  // namespace sr::cpu

// out[i - a_begin][j] = <a_i, b_j> for rows i in [a_begin, a_end) of a and every row j of b. `scratch` holds `dim`
// zeroed floats (left zeroed), or is null to merge rows instead.
SR_SIMD_DECLARE(void sparse_dot_rows(const CsrView& a, const CsrView& b, int64_t a_begin, int64_t a_end,
                                     float* out, float* scratch))
// Gradient of out = A B^T with respect to A's values, for rows [a_begin, a_end) of a: grad[p] for each non-zero
// p = (i, c) of those rows is sum_j g[i][j] * b[j, c]; g is row-major (a.rows, b.rows). `scratch` as above.
SR_SIMD_DECLARE(void sparse_dot_grad_rows(const CsrView& a, const CsrView& b, const float* g, int64_t a_begin,
                                          int64_t a_end, float* grad, float* scratch))
// out[i] = <a_i, b_i> for i in [begin, end).
SR_SIMD_DECLARE(void pairwise_dot_rows(const CsrView& a, const CsrView& b, int64_t begin, int64_t end, float* out))
// Gradient of out[i] = <a_i, b_i> with respect to a's values: grad[p] = g[i] * b[i, c] for p = (i, c).
SR_SIMD_DECLARE(void pairwise_dot_grad_rows(const CsrView& a, const CsrView& b, const float* g, int64_t begin,
                                            int64_t end, float* grad))
