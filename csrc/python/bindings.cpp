// The Python extension module sgfused._C. Loading it registers every operator
// (static initialisers in ops.cpp and the device files); the module itself only
// exposes the build facts.
#include <pybind11/pybind11.h>

#include "../build_info.h"

PYBIND11_MODULE(_C, module) {
  module.doc() = "sgfused compiled operators (registered under torch.ops.sgfused) and build facts";
  module.def("build_info_json", &sgfused::build_info_json,
             "JSON string: compiled backends, CUDA arch list, torch version built against");
}
