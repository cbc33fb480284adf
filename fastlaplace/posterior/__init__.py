"""Laplace posteriors: Kronecker-factored (K-FAC, EKFAC), diagonal, full, low rank, and function space (GP)."""

from fastlaplace.posterior.base import BaseLaplace
from fastlaplace.posterior.diag import DiagLaplace
from fastlaplace.posterior.ekfac import EKFACLaplace
from fastlaplace.posterior.full import FullLaplace
from fastlaplace.posterior.functional import FunctionalLaplace
from fastlaplace.posterior.kron import KronLaplace
from fastlaplace.posterior.lowrank import LowRankLaplace
from fastlaplace.posterior.parametric import ParametricLaplace

__all__ = [
    "BaseLaplace",
    "DiagLaplace",
    "EKFACLaplace",
    "FullLaplace",
    "FunctionalLaplace",
    "KronLaplace",
    "LowRankLaplace",
    "ParametricLaplace",
]
