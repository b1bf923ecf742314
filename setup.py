"""Builds sgfused._C: the C++ CPU kernels always, the CUDA kernels when torch and nvcc allow.

CUDA is compiled when the installed torch is a CUDA build and nvcc is found, or
when FORCE_CUDA=1. Without a visible GPU the target architectures come from
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). CPU kernels get -fopenmp when torch
was built with OpenMP, so at::parallel_for really runs in parallel, and
-march=$SGFUSED_CPU_MARCH (default native: the row scans vectorise; set it empty
for a portable binary).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    with_cuda = want_cuda()
    sources = ["csrc/ops.cpp", "csrc/python/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    macros = [("SGFUSED_TORCH_VERSION", f'"{torch.__version__}"')]
    march = os.environ.get("SGFUSED_CPU_MARCH", "native")  # "" builds a portable binary
    cxx = ["-O3"] + ([f"-march={march}"] if march else []) + openmp
    if not with_cuda:
        return CppExtension(
            "sgfused._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=openmp
        )
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected")
    macros += [("SGFUSED_WITH_CUDA", None), ("SGFUSED_CUDA_ARCHS", f'"{archs}"')]
    return CUDAExtension(
        "sgfused._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=openmp,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
