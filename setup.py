"""Build of fastlaplace._C: CPU kernels always, CUDA kernels too when torch has CUDA.

The choice follows torch.version.cuda (never torch.cuda.is_available(): a build machine
may have no GPU). FASTLAPLACE_FORCE_CPU=1 skips the CUDA kernels; FASTLAPLACE_FORCE_CUDA=1
insists on them and fails loudly when they cannot be built.
"""

import glob
import os
import sys

import torch
from packaging.version import Version
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

if Version(torch.__version__.split("+")[0]) < Version("2.6"):
    sys.exit(f"fastlaplace needs torch>=2.6, found {torch.__version__}")

force_cpu = os.environ.get("FASTLAPLACE_FORCE_CPU") == "1"
force_cuda = os.environ.get("FASTLAPLACE_FORCE_CUDA") == "1"
with_cuda = (torch.version.cuda is not None or force_cuda) and not force_cpu
if force_cuda and torch.version.cuda is None:
    sys.exit("FASTLAPLACE_FORCE_CUDA=1 but the installed torch has no CUDA")

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/engines/*.cpp"))
# The CUDA kernels' host emulations and their private schemas, for the tests.
sources += sorted(glob.glob("csrc/emulation/*.cpp"))
# at::parallel_for / parallel_reduce are inline OpenMP regions: without -fopenmp they
# silently run on one thread. The OpenMP runtime is the one torch already loaded.
cxx_flags = ["-O3", "-fopenmp"]
link_flags = ["-fopenmp"]
if with_cuda:
    # Without a visible GPU torch cannot detect the architecture to build for.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension(
        "fastlaplace._C",
        sources,
        extra_compile_args={
            "cxx": [*cxx_flags, "-DFASTLAPLACE_WITH_CUDA"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-DFASTLAPLACE_WITH_CUDA"],
        },
        extra_link_args=link_flags,
        py_limited_api=True,
    )
else:
    extension = CppExtension(
        "fastlaplace._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
