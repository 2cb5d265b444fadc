// Coupled-quantization CUDA kernels (torch-free: raw device pointers and a stream). Same definitions as the CPU
// kernels in kernels/cpu/cq.h and sparse_retrieval.reference.cq_encode / cq_decode / cq_attention.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sr::cuda {

// x (rows, groups * g) float32, books (groups, k, g) float32 -> codes (rows, groups), uint8 or int16.
void cq_encode(const float* x, int64_t rows, int64_t groups, int64_t g, int64_t k, const float* books, void* codes,
               int code_bytes, cudaStream_t stream);

// codes (rows, groups) -> out (rows, groups * g), copying elements of `elem_bytes` (2 or 4) from books (groups, k, g).
void cq_decode(const void* codes, int code_bytes, int64_t rows, int64_t groups, int64_t g, int64_t k,
               const void* books, int elem_bytes, void* out, cudaStream_t stream);

struct CqAttentionArgs {
  const float* q;  // (B, Hq, Tq, D)
  int64_t B, Hq, Hkv, Tq, D, g, k;
  const void* k_codes;  // (T, G) blocks of each (b, h) at b * stride_b + h * stride_h elements
  const void* v_codes;
  int code_bytes;
  int64_t stride_b, stride_h, t_coded;
  const int64_t* lengths;  // (B,)
  const float* k_books;    // (Hkv * G, k, g)
  const float* v_books;
  const float* k_recent;  // (B, Hkv, W, D) or null
  const float* v_recent;
  int64_t w;
  float scale;
  float* out;  // (B, Hq, Tq, D)
};

// Floats of scratch memory cq_attention needs.
int64_t cq_attention_workspace(const CqAttentionArgs& a);
void cq_attention(const CqAttentionArgs& a, float* workspace, cudaStream_t stream);

}  // namespace sr::cuda
