// Dispatch over the value types of the CUDA kernels (read as float32 by to_float, host_device.h).
#pragma once

#include <cstdint>

#include "kernels/cpu/sparse_dot.h"
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

}  // namespace sr::cuda
