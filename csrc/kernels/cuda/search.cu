#include "kernels/cuda/search.h"
#include "kernels/cuda/value_load.cuh"

namespace sr::cuda {
namespace {

using namespace searchchunk;

template <class W>
__global__ void __launch_bounds__(kThreads) search_kernel(Segments segs, Queries qs, Output out) {
  __shared__ Shared sh;
  DeviceBlock blk;
  search_block<W>(blk, sh, segs, blockIdx.x, blockIdx.y, qs, out);
}

}  // namespace

cudaError_t search_chunks(const Segments& segs, int64_t nq, const Queries& qs, sr::cpu::ValueType wtype,
                          const Output& out, cudaStream_t stream) {
  if (nq == 0 || segs.chunks == 0 || out.kk == 0) return cudaSuccess;
  if (segs.chunks > 0x7FFFFFFF || nq > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(segs.chunks), static_cast<unsigned>(nq));
  visit_value_type(wtype, [&](auto v) { search_kernel<decltype(v)><<<grid, kThreads, 0, stream>>>(segs, qs, out); });
  return cudaGetLastError();
}

}  // namespace sr::cuda
