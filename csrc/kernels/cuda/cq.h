// Coupled-quantization CUDA kernels (torch-free: raw device pointers and a stream). Same definitions as the CPU
// kernels in kernels/cpu/cq.h and sparse_retrieval.reference.cq_encode / cq_decode / cq_attention.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cq_fused.h"  // CqAttentionArgs

namespace sr::cuda {

// x (rows, groups * g) float32, books (groups, k, g) float32 -> codes (rows, groups), uint8 or int16.
void cq_encode(const float* x, int64_t rows, int64_t groups, int64_t g, int64_t k, const float* books, void* codes,
               int code_bytes, cudaStream_t stream);

// codes (rows, groups) -> out (rows, groups * g), copying elements of `elem_bytes` (2 or 4) from books (groups, k, g).
void cq_decode(const void* codes, int code_bytes, int64_t rows, int64_t groups, int64_t g, int64_t k,
               const void* books, int elem_bytes, void* out, cudaStream_t stream);

// How cq_attention runs on the current device. SPARSE_RETRIEVAL_CQ_FUSED=1 in the environment selects the fused
// kernels (cq_fused.h) wherever the rows' tables fit in shared memory; otherwise the multi-pass kernels run, which
// cannot honour a.starts. The fused kernels are opt-in until their current version has passed the GPU tests
// (docs/benchmarks.md says which version ran).
struct CqAttentionLaunch {
  cqfused::Plan fused;  // fused.rows_per_block == 0: multi-pass
  int64_t workspace_floats;
};
CqAttentionLaunch cq_attention_plan(const CqAttentionArgs& a);
void cq_attention(const CqAttentionArgs& a, const CqAttentionLaunch& launch, float* workspace, cudaStream_t stream);

}  // namespace sr::cuda
