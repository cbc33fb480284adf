"""fastlaplace: fast Laplace approximations for PyTorch.

``Laplace(model, likelihood, subset_of_weights, hessian_structure)`` builds a posterior
(:mod:`fastlaplace.posterior`) from the curvature of :mod:`fastlaplace.curvature`; the
heavy steps are the compiled operators of :mod:`fastlaplace.ops` (their pure-PyTorch
oracle is :mod:`fastlaplace.reference`).
"""

from fastlaplace import distributed, ops, optim, subnetwork
from fastlaplace.laplace import Laplace

__all__ = ["Laplace", "distributed", "ops", "optim", "subnetwork"]
__version__ = "0.1.0"
