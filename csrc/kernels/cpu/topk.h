// Top-k selection along a row, torch-free (see csrc/ops/topk.cpp for the glue).
//
// Every candidate is one 64-bit key, larger = better: the high 32 bits are an order-preserving code of the value
// (NaN above +inf, -0 equal to +0, inverted for smallest-first), the low 32 bits are 0xFFFFFFFF - index so that
// equal values prefer the lower index. Selecting the k largest keys therefore is the whole top-k, ties included.
#pragma once

#include <cstdint>

#include "kernels/cpu/simd.h"

namespace sr::cpu {

enum class TopkDtype : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline int64_t topk_key_index(uint64_t key) { return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

}  // namespace sr::cpu

// Selects the best min(k, hi - lo) elements of row[lo, hi) (row: contiguous elements of `dtype`; indices count
// from row[0]) and writes their keys, in no particular order, to `keys` (room for k). Returns how many.
// Scans with SIMD threshold filtering: only elements better than the current k-th best enter a small buffer.
SR_SIMD_DECLARE(int64_t topk_select(const void* row, sr::cpu::TopkDtype dtype, int64_t lo, int64_t hi, int64_t k,
                                    bool largest, uint64_t* keys))
// Keeps the best k of keys[0, count) (count >= k), optionally sorts them best first, and writes the elements'
// values (copied from row, in its dtype) and indices.
SR_SIMD_DECLARE(void topk_emit(uint64_t* keys, int64_t count, int64_t k, bool sorted, const void* row,
                               sr::cpu::TopkDtype dtype, void* values, int64_t* indices))
