// Checks every op's glue makes before reading a tensor argument.
#pragma once

#include <ATen/ATen.h>

namespace sr::ops {

// torch.ops passes None for a Tensor argument as an undefined tensor, which would reach the kernels as a null
// pointer: refuse it by name. Arguments come in (tensor, name) pairs.
inline void require_defined() {}

template <class... Rest>
void require_defined(const at::Tensor& t, const char* name, const Rest&... rest) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a tensor, got None");
  require_defined(rest...);
}

}  // namespace sr::ops
