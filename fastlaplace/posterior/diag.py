"""Diagonal Laplace posterior."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace.curvature import DiagCurvature
from fastlaplace.curvature.products import jacobian_gram
from fastlaplace.posterior.parametric import ParametricLaplace


class DiagLaplace(ParametricLaplace):
    """``P = diag(H) / (σ² T) + δ``: each ``[W | b]`` entry independent."""

    def _reset_curvature(self) -> None:
        self.curvature = DiagCurvature()

    def _update_curvature(self, stats, new_batch: bool = True) -> None:
        self.curvature.update(stats, new_batch)

    def posterior_precision(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> list[Tensor]:
        """Per layer, the ``(d_out, d_in + bias)`` diagonal of P."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else prior_precision
        scale = self._curvature_scale(self.sigma_noise if sigma_noise is None else sigma_noise)
        deltas = self._prior_per_layer(delta)
        return [scale * d + delta_l for d, delta_l in zip(self.curvature.diagonals, deltas, strict=True)]

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """The log-determinant Σ log P."""
        return torch.stack([p.log().sum() for p in self.posterior_precision(prior_precision, sigma_noise)]).sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        precisions = self.posterior_precision()
        return jacobian_gram(stats, [p.reciprocal() for p in precisions])

    def _jacobian_cross_covariance(self, stats) -> Tensor:
        return jacobian_gram(stats, [p.reciprocal() for p in self.posterior_precision()], joint=True)

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        return [
            torch.randn((n_samples, *p.shape), dtype=p.dtype, device=p.device, generator=generator) * p.rsqrt()
            for p in self.posterior_precision()
        ]

    def _curvature_tensors(self) -> list[Tensor]:
        return self.curvature.diagonals

    def _check_curvature_values(self, tensors: list[Tensor]) -> None:
        super()._check_curvature_values(tensors)
        if any(bool((t < 0).any()) for t in tensors):
            raise ValueError("the state's curvature diagonals must be non-negative")

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        self.curvature.names = [name for name, _ in self.layers]
        self.curvature.diagonals = tensors
        self.curvature.num_data = num_data
