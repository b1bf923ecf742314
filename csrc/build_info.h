// Build facts baked in by setup.py / CMake, reported by sgfused.build_info().
#pragma once
#include <string>

#ifndef SGFUSED_TORCH_VERSION
#define SGFUSED_TORCH_VERSION "unknown"
#endif
#ifndef SGFUSED_CUDA_ARCHS
#define SGFUSED_CUDA_ARCHS ""
#endif

namespace sgfused {
// JSON object: {"backends": [...], "cuda_arch_list": "...", "torch_version": "...", "openmp": bool}
std::string build_info_json();
}  // namespace sgfused
