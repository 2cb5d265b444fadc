// Coupled-quantization kernels (torch-free): nearest-centroid encoding, decoding, and decode-step attention read
// straight from the codes. Definitions of "correct": sparse_retrieval.reference.cq_encode / cq_decode /
// cq_attention. Codes are uint8 (code_bytes 1) or int16 (code_bytes 2), stored (rows, groups).
#pragma once

#include <cstdint>

#include "kernels/cpu/simd.h"

// x (rows, groups * g) float32; books_t (groups, g, k_padded): each group's codebook transposed, padded to a
// multiple of 16 centroids with NaN (a NaN distance never wins). Writes codes (rows, groups): nearest centroid by
// squared distance, ties to the lowest code.
SR_SIMD_DECLARE(void cq_encode_rows(const float* x, int64_t rows, int64_t groups, int64_t g, int64_t k_padded,
                                   const float* books_t, void* codes, int code_bytes))

// codes (rows, groups) -> out (rows, groups * g) by copying the centroid's `elem_bytes`-wide elements from books
// (groups, k, g). Codes must already be checked to lie in [0, k).
SR_SIMD_DECLARE(void cq_decode_rows(const void* codes, int code_bytes, int64_t rows, int64_t groups, int64_t g,
                                   int64_t k, const void* books, int elem_bytes, void* out))

namespace sr::cpu {

// One (sequence, key/value head) of cq_attention. The R = rep * tq query rows of the head's query heads are
// contiguous in q (R, D); codes are (t_coded, G) with G = D / g; books_t (G, g, k) are this head's codebooks,
// transposed; recent keys/values (w, D) may be null when w == 0. `length` coded tokens are real; query t sees no
// position of [coded, recent] below starts[t] (null: 0). Writes out (R, D).
struct CqAttentionHead {
  const float* q;
  int64_t rep, tq, d, g, k;
  const void* k_codes;
  const void* v_codes;
  int code_bytes;
  int64_t t_coded, length;
  const int64_t* starts;
  const float* k_books_t;
  const float* v_books_t;
  const float* k_recent;
  const float* v_recent;
  int64_t w;
  float scale;
  float* out;
};

}  // namespace sr::cpu

SR_SIMD_DECLARE(void cq_attention_head(const ::sr::cpu::CqAttentionHead& a))
