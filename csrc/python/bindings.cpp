// The Python extension module sgfused._C. Loading it registers every operator
// (static initialisers in ops.cpp and the device files); the module itself only
// exposes the build facts and the CPU fact the CPU kernels go by.
#include <pybind11/pybind11.h>

#include "../build_info.h"
#include "../cpu/bf16_gemm.h"

PYBIND11_MODULE(_C, module) {
  module.doc() = "sgfused compiled operators (registered under torch.ops.sgfused) and build facts";
  module.def("build_info_json", &sgfused::build_info_json,
             "JSON string: compiled backends, CUDA arch list, torch version built against");
  module.def("cpu_bf16_dot", &sgfused::cpu_bf16_dot,
             "the CPU's bf16 dot instructions the C++ kernels' bf16 GEMMs wait for: amx_bf16, avx512_bf16 or ''");
}
