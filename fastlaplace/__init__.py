"""fastlaplace: fast Laplace approximations for PyTorch.

The curvature operators live in :mod:`fastlaplace.ops` (compiled C++/CUDA kernels,
with their pure-PyTorch oracle in :mod:`fastlaplace.reference`).
"""

from fastlaplace import ops

__all__ = ["ops"]
__version__ = "0.1.0"
