#include "kernels/cuda/sparse_dot.h"
#include "kernels/cuda/value_load.cuh"

namespace sr::cuda {
namespace {

using sr::cpu::CsrView;

constexpr int kThreads = 256;

template <class V, class I>
struct Rows {
  const int64_t* ptr;
  const I* idx;
  const V* val;
};

template <class V, class I>
Rows<V, I> rows_of(const CsrView& c) {
  return {c.indptr, static_cast<const I*>(c.indices), static_cast<const V*>(c.values)};
}

// <a_i, b_j> by merging the two sorted rows.
template <class V, class I>
__device__ float merge_dot(const Rows<V, I>& a, int64_t i, const Rows<V, I>& b, int64_t j) {
  int64_t p = a.ptr[i], pe = a.ptr[i + 1], q = b.ptr[j], qe = b.ptr[j + 1];
  float s = 0.0f;
  while (p < pe && q < qe) {
    const I x = a.idx[p], y = b.idx[q];
    if (x == y) s += to_float(a.val[p++]) * to_float(b.val[q++]);
    else if (x < y) ++p;
    else ++q;
  }
  return s;
}

// Row containing non-zero p: the last i with ptr[i] <= p.
__device__ int64_t row_of(const int64_t* ptr, int64_t rows, int64_t p) {
  int64_t lo = 0, hi = rows;  // invariant: ptr[lo] <= p < ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (ptr[mid] <= p) lo = mid; else hi = mid;
  }
  return lo;
}

// Value of column c in row j of b, or 0.
template <class V, class I>
__device__ float value_at(const Rows<V, I>& b, int64_t j, I c) {
  int64_t lo = b.ptr[j], hi = b.ptr[j + 1];
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (b.idx[mid] < c) lo = mid + 1; else hi = mid;
  }
  return lo < b.ptr[j + 1] && b.idx[lo] == c ? to_float(b.val[lo]) : 0.0f;
}

template <class V, class I>
__global__ void sparse_dot_kernel(Rows<V, I> a, int64_t na, Rows<V, I> b, int64_t nb, float* out) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = blockIdx.y; i < na && j < nb; i += gridDim.y) out[i * nb + j] = merge_dot(a, i, b, j);
}

template <class V, class I>
__global__ void sparse_dot_grad_kernel(Rows<V, I> a, int64_t na, int64_t nnz, Rows<V, I> b, int64_t nb,
                                       const float* g, float* grad) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= nnz) return;
  const int64_t i = row_of(a.ptr, na, p);
  float s = 0.0f;
  for (int64_t j = 0; j < nb; ++j) {
    const float w = g[i * nb + j];
    if (w != 0.0f) s += w * value_at(b, j, a.idx[p]);
  }
  grad[p] = s;
}

template <class V, class I>
__global__ void pairwise_kernel(Rows<V, I> a, Rows<V, I> b, int64_t n, float* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = merge_dot(a, i, b, i);
}

template <class V, class I>
__global__ void pairwise_grad_kernel(Rows<V, I> a, int64_t n, int64_t nnz, Rows<V, I> b, const float* g,
                                     float* grad) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= nnz) return;
  const int64_t i = row_of(a.ptr, n, p);
  grad[p] = g[i] * value_at(b, i, a.idx[p]);
}

template <class F>
void visit(const CsrView& b, F&& f) {
  visit_value_type(b.vtype, [&](auto v) {
    if (b.idx64) f(v, int64_t{}); else f(v, int32_t{});
  });
}

unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

}  // namespace

void sparse_dot(const CsrView& a, const CsrView& b, float* out, cudaStream_t stream) {
  if (a.rows == 0 || b.rows == 0) return;
  visit(b, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    const dim3 grid(blocks_for(b.rows), unsigned(a.rows < 65535 ? a.rows : 65535));
    sparse_dot_kernel<V, I><<<grid, kThreads, 0, stream>>>(rows_of<V, I>(a), a.rows, rows_of<V, I>(b), b.rows, out);
  });
}

void sparse_dot_grad(const CsrView& a, int64_t a_nnz, const CsrView& b, const float* g, float* grad,
                     cudaStream_t stream) {
  if (a_nnz == 0) return;
  visit(b, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    sparse_dot_grad_kernel<V, I><<<blocks_for(a_nnz), kThreads, 0, stream>>>(
        rows_of<V, I>(a), a.rows, a_nnz, rows_of<V, I>(b), b.rows, g, grad);
  });
}

void pairwise_dot(const CsrView& a, const CsrView& b, float* out, cudaStream_t stream) {
  if (a.rows == 0) return;
  visit(b, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    pairwise_kernel<V, I><<<blocks_for(a.rows), kThreads, 0, stream>>>(rows_of<V, I>(a), rows_of<V, I>(b), a.rows,
                                                                       out);
  });
}

void pairwise_dot_grad(const CsrView& a, int64_t a_nnz, const CsrView& b, const float* g, float* grad,
                       cudaStream_t stream) {
  if (a_nnz == 0) return;
  visit(b, [&](auto v, auto i) {
    using V = decltype(v);
    using I = decltype(i);
    pairwise_grad_kernel<V, I><<<blocks_for(a_nnz), kThreads, 0, stream>>>(rows_of<V, I>(a), a.rows, a_nnz,
                                                                           rows_of<V, I>(b), g, grad);
  });
}

}  // namespace sr::cuda
