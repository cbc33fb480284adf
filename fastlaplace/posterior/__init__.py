"""Laplace posteriors over the Linear layers of a model: Kronecker-factored, diagonal, full, low rank."""

from fastlaplace.posterior.base import BaseLaplace
from fastlaplace.posterior.diag import DiagLaplace
from fastlaplace.posterior.full import FullLaplace
from fastlaplace.posterior.kron import KronLaplace
from fastlaplace.posterior.lowrank import LowRankLaplace

__all__ = ["BaseLaplace", "DiagLaplace", "FullLaplace", "KronLaplace", "LowRankLaplace"]
