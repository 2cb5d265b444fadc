// SR_HD marks the per-thread code of a CUDA kernel that a host emulation test also compiles (with any C++17
// compiler, no CUDA): __host__ __device__ under nvcc, plain inline elsewhere. to_float reads float32 values
// everywhere and float16 / bfloat16 ones on the device. DeviceBlock is the Block policy of such code on the GPU;
// each emulation test has its host twin. opted_in reads the switch of a kernel that is opt-in.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__CUDACC__)
#define SR_HD __host__ __device__ __forceinline__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#define SR_HD inline
#endif

namespace sr::cuda {

// An opt-in kernel's switch: the environment variable `name` is "1". Read at every call, so that tests can flip it.
inline bool opted_in(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, "1") == 0;
}

SR_HD float to_float(float v) { return v; }
#if defined(__CUDACC__)
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Each thread runs a phase for its own id, then the block synchronises.
struct DeviceBlock {
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  template <class F>
  __device__ __forceinline__ bool each_or(F&& f) {
    return __syncthreads_or(f(static_cast<int>(threadIdx.x)));
  }
  __device__ __forceinline__ unsigned int atomic_add(unsigned int* p, unsigned int v) { return atomicAdd(p, v); }
  __device__ __forceinline__ float atomic_add(float* p, float v) { return atomicAdd(p, v); }
  // Global memory other blocks wrote before a barrier or an arrive: read past the L1 cache.
  template <class T>
  __device__ __forceinline__ T load(const T* p) {
    return __ldcg(p);
  }
  // Counts this block in at *p after its writes are visible to the blocks that count in later; returns the count
  // before it.
  __device__ __forceinline__ unsigned int arrive(unsigned int* p) {
    __threadfence();
    const unsigned int old = atomicAdd(p, 1u);
    __threadfence();
    return old;
  }
};
#endif

}  // namespace sr::cuda
