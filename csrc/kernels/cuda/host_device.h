// SR_HD marks the per-thread code of a CUDA kernel that a host emulation test also compiles (with any C++17
// compiler, no CUDA): __host__ __device__ under nvcc, plain inline elsewhere.
#pragma once

#if defined(__CUDACC__)
#define SR_HD __host__ __device__ __forceinline__
#else
#define SR_HD inline
#endif
