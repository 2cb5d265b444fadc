// Top-k for k <= kSmallTopk: the block selection of topk_select.h on the GPU (see topk.h).
//
// One read of each row. Rows of up to 1024 elements share a block (2 to 8 per block); longer rows get a block
// each. When rows are too few to give two blocks per SM, each row is cut into parts (of at least kMinPart
// elements), each part's k best keys go to the workspace, and a second launch selects the row's k best among its
// parts' keys. Both launches write results sorted best first, so `sorted` costs nothing. No host sync.
#include "kernels/cuda/topk.h"
#include "kernels/cuda/value_load.cuh"  // visit_topk_dtype

namespace sr::cuda {
namespace {

using namespace blockselect;

template <class Src, class Out>
__global__ void __launch_bounds__(kThreads) select_kernel(Src src, Out out, Plan plan) {
  __shared__ Key smem[kSmemKeys];
  __shared__ unsigned int cnt[kMaxGroups];
  DeviceBlock blk;
  select_block(blk, smem, cnt, blockIdx.x, plan, src, out);
}

template <class Src, class Out>
cudaError_t launch(const Src& src, const Out& out, const Plan& plan, cudaStream_t stream) {
  const int64_t blocks = (plan.rows * plan.parts + plan.groups - 1) / plan.groups;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  select_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(src, out, plan);
  return cudaGetLastError();
}

Plan plan_for(int64_t rows, int64_t n, int64_t k) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return make_plan(rows, n, static_cast<int>(k), 2 * int64_t{sms});
}

template <class T>
cudaError_t run(const T* x, const Plan& plan, bool largest, T* values, int64_t* indices, Key* part_keys,
                cudaStream_t stream) {
  const ResultOut<T> result{x, plan.n, plan.k, values, indices};
  const ValueKeys<T> src{x, plan.n, largest};
  if (plan.parts == 1) return launch(src, result, plan, stream);
  const cudaError_t err = launch(src, PartOut{part_keys, plan.k, plan.parts}, plan, stream);
  if (err != cudaSuccess) return err;
  const int64_t merged = int64_t{plan.parts} * plan.k;
  return launch(StoredKeys{part_keys, merged}, result, make_plan(plan.rows, merged, plan.k, 0), stream);
}

}  // namespace

size_t topk_small_workspace_bytes(int64_t rows, int64_t n, int64_t k) {
  const Plan plan = plan_for(rows, n, k);
  return plan.parts == 1 ? 0 : static_cast<size_t>(rows) * plan.parts * k * sizeof(Key);
}

cudaError_t topk_small(const void* x, TopkDtype dtype, int64_t rows, int64_t n, int64_t k, bool largest,
                       void* values, int64_t* indices, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  if (k > kSmallTopk) return cudaErrorInvalidValue;
  const Plan plan = plan_for(rows, n, k);
  if (plan.parts > 1 && static_cast<size_t>(rows) * plan.parts * k * sizeof(Key) > workspace_bytes) {
    return cudaErrorInvalidValue;
  }
  Key* part_keys = static_cast<Key*>(workspace);
  return visit_topk_dtype(dtype, [&](auto v) {
    using T = decltype(v);
    return run(static_cast<const T*>(x), plan, largest, static_cast<T*>(values), indices, part_keys, stream);
  });
}

}  // namespace sr::cuda
