// CUDA sparse x sparse dot products (torch-free launchers): same meaning as the CPU kernels of
// kernels/cpu/sparse_dot.h, one thread per output entry (all pairs, rows) or per non-zero (gradients).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/sparse_dot.h"

namespace sr::cuda {

// out (a.rows, b.rows) row-major.
void sparse_dot(const sr::cpu::CsrView& a, const sr::cpu::CsrView& b, float* out, cudaStream_t stream);
// grad[p] for every non-zero p of a: sum_j g[i][j] * b[j, col(p)]; g is (a.rows, b.rows); a.values unused.
void sparse_dot_grad(const sr::cpu::CsrView& a, int64_t a_nnz, const sr::cpu::CsrView& b, const float* g,
                     float* grad, cudaStream_t stream);
void pairwise_dot(const sr::cpu::CsrView& a, const sr::cpu::CsrView& b, float* out, cudaStream_t stream);
// grad[p] = g[i] * b[i, col(p)] for every non-zero p = (i, col) of a.
void pairwise_dot_grad(const sr::cpu::CsrView& a, int64_t a_nnz, const sr::cpu::CsrView& b, const float* g,
                       float* grad, cudaStream_t stream);

}  // namespace sr::cuda
