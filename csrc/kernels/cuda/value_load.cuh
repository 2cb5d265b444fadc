// float32 / float16 / bfloat16 values read as float32 on the GPU, and dispatch over (value, index) types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cpu/sparse_dot.h"

namespace sr::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Calls f(V{}) with the CUDA value type of `vtype`.
template <class F>
void visit_value_type(sr::cpu::ValueType vtype, F&& f) {
  switch (vtype) {
    case sr::cpu::ValueType::F16: f(__half{}); break;
    case sr::cpu::ValueType::BF16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

}  // namespace sr::cuda
