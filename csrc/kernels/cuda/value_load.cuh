// Dispatch over the value types of the CUDA kernels (read as float32 by to_float, host_device.h).
#pragma once

#include <cstdint>

#include "kernels/cpu/sparse_dot.h"
#include "kernels/cpu/topk.h"  // TopkDtype
#include "kernels/cuda/host_device.h"  // to_float

namespace sr::cuda {

// Calls f(V{}) with the CUDA value type of `vtype`.
template <class F>
void visit_value_type(sr::cpu::ValueType vtype, F&& f) {
  switch (vtype) {
    case sr::cpu::ValueType::F16: f(__half{}); break;
    case sr::cpu::ValueType::BF16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

// Calls f(T{}) with the CUDA type of a top-k input's `dtype`, returning what f returns.
template <class F>
auto visit_topk_dtype(sr::cpu::TopkDtype dtype, F&& f) {
  switch (dtype) {
    case sr::cpu::TopkDtype::Float16:
      return f(__half{});
    case sr::cpu::TopkDtype::BFloat16:
      return f(__nv_bfloat16{});
    default:
      return f(float{});
  }
}

}  // namespace sr::cuda
