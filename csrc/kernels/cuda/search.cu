#include "kernels/cuda/search.h"
#include "kernels/cuda/value_load.cuh"

#include <math_constants.h>

namespace sr::cuda {
namespace {

constexpr int kThreads = 512;

// a ranks before b: higher score, then lower id.
__device__ __forceinline__ bool before(float sa, int ia, float sb, int ib) { return sa > sb || (sa == sb && ia < ib); }

__device__ int64_t lower_bound(const int32_t* docs, int64_t lo, int64_t hi, int64_t value) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (docs[mid] < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <class W>
__global__ void __launch_bounds__(kThreads) search_chunks_kernel(const DevSegment* segs, const int64_t* chunks,
                                                                 int64_t nchunks, const int64_t* qptr,
                                                                 const int64_t* qterms, const float* qweights,
                                                                 int64_t kk, float* cand_scores, int64_t* cand_ids) {
  __shared__ float acc[kSearchChunk];
  __shared__ int pos[kSearchChunk];
  __shared__ int64_t range_lo[kThreads], range_hi[kThreads];
  const int64_t c = blockIdx.x, qi = blockIdx.y;
  const DevSegment seg = segs[chunks[4 * c]];
  const int64_t lo = chunks[4 * c + 1], hi = chunks[4 * c + 2], first_id = chunks[4 * c + 3];
  const int n = int(hi - lo);
  const W* w = static_cast<const W*>(seg.weights);
  for (int i = threadIdx.x; i < kSearchChunk; i += kThreads) {
    acc[i] = i < n ? 0.0f : -CUDART_INF_F;
    pos[i] = i;
  }
  // Terms in tiles of kThreads: each thread finds one term's postings inside [lo, hi), then all scatter them.
  for (int64_t tile = qptr[qi]; tile < qptr[qi + 1]; tile += kThreads) {
    const int64_t m = min(int64_t(kThreads), qptr[qi + 1] - tile);
    __syncthreads();
    if (threadIdx.x < m) {
      const int64_t t = qterms[tile + threadIdx.x];
      const int64_t a = lower_bound(seg.docs, seg.ptr[t], seg.ptr[t + 1], lo);
      range_lo[threadIdx.x] = a;
      range_hi[threadIdx.x] = lower_bound(seg.docs, a, seg.ptr[t + 1], hi);
    }
    __syncthreads();
    for (int64_t j = 0; j < m; ++j) {
      const float qw = qweights[tile + j];
      for (int64_t p = range_lo[j] + threadIdx.x; p < range_hi[j]; p += kThreads) {
        atomicAdd(&acc[seg.docs[p] - lo], qw * to_float(w[p]));
      }
    }
  }
  __syncthreads();
  // Bitonic sort of the chunk, best first.
  for (int size = 2; size <= kSearchChunk; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < kSearchChunk; i += kThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const bool ascending = (i & size) == 0;
          if (ascending == before(acc[j], pos[j], acc[i], pos[i])) {
            const float s = acc[i];
            acc[i] = acc[j];
            acc[j] = s;
            const int p = pos[i];
            pos[i] = pos[j];
            pos[j] = p;
          }
        }
      }
      __syncthreads();
    }
  }
  float* out_s = cand_scores + (qi * nchunks + c) * kk;
  int64_t* out_i = cand_ids + (qi * nchunks + c) * kk;
  for (int64_t i = threadIdx.x; i < kk; i += kThreads) {
    const bool real = i < n;
    out_s[i] = real ? acc[i] : -CUDART_INF_F;
    out_i[i] = real ? first_id + pos[i] : -1;
  }
}

}  // namespace

void search_chunks(const DevSegment* segs, const int64_t* chunks, int64_t nchunks, int64_t nq, const int64_t* qptr,
                   const int64_t* qterms, const float* qweights, int64_t kk, sr::cpu::ValueType wtype,
                   float* cand_scores, int64_t* cand_ids, cudaStream_t stream) {
  if (nq == 0 || nchunks == 0 || kk == 0) return;
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(nq));
  visit_value_type(wtype, [&](auto v) {
    search_chunks_kernel<decltype(v)><<<grid, kThreads, 0, stream>>>(segs, chunks, nchunks, qptr, qterms, qweights,
                                                                     kk, cand_scores, cand_ids);
  });
}

}  // namespace sr::cuda
