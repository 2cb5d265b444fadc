// The pybind11 module: build facts and the SIMD level switch. Tensor ops are registered with TORCH_LIBRARY
// fragments in csrc/ops/ and reached through torch.ops.sparse_retrieval.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "kernels/cpu/simd.h"

namespace py = pybind11;
using sr::cpu::SimdLevel;

// The namespace is defined here once; each op family adds its schemas with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(sparse_retrieval, m) {}

namespace {

std::vector<std::string> simd_levels(bool supported_only) {
  std::vector<std::string> out;
  for (int i = 0; i <= 3; ++i) {
    auto level = static_cast<SimdLevel>(i);
    if (supported_only ? sr::cpu::simd_supported(level) : sr::cpu::simd_compiled(level)) {
      out.emplace_back(sr::cpu::simd_name(level));
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparse_retrieval native extension";
  m.attr("__version__") = SR_VERSION;
  m.attr("torch_version") = SR_TORCH_VERSION;
#ifdef SR_WITH_CUDA
  m.attr("cuda_version") = SR_CUDA_VERSION;
  m.attr("cuda_archs") = SR_CUDA_ARCHS;
#else
  m.attr("cuda_version") = py::none();
  m.attr("cuda_archs") = py::none();
#endif
  m.def("simd_compiled", [] { return simd_levels(false); }, "SIMD levels compiled into this build.");
  m.def("simd_supported", [] { return simd_levels(true); }, "Compiled SIMD levels this CPU can run.");
  m.def("simd_detected", [] { return std::string(sr::cpu::simd_name(sr::cpu::detected_simd())); });
  m.def("simd_get", [] { return std::string(sr::cpu::simd_name(sr::cpu::active_simd())); });
  m.def(
      "simd_set",
      [](const std::string& name) {
        try {
          sr::cpu::set_simd(sr::cpu::simd_from_name(name));
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("level"));
}
