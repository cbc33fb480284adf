"""Full-covariance Laplace posterior (small models: P x P memory)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import ops
from fastlaplace.posterior.base import BaseLaplace
from fastlaplace.reference import accumulation_dtype


def _weight_gradients(stats) -> Tensor:
    """``(N, K, P)``: each backpropagated column as a gradient w.r.t. all layers' ``[W | b]``.

    With the output Jacobians as columns this is the Jacobian ``J`` itself.
    """
    return torch.cat([s.weight_gradients() for s in stats], dim=-1)


class FullLaplace(BaseLaplace):
    """``P = H / (σ² T) + diag(δ)`` with the dense GGN (or Fisher) H over all covered weights."""

    def _reset_curvature(self) -> None:
        self.hessian: Tensor | None = None
        self._cholesky = None

    def _update_curvature(self, stats) -> None:
        columns = _weight_gradients(stats).flatten(0, 1)  # (N*K, P)
        if self.hessian is None:
            size = columns.shape[1]
            self.hessian = torch.zeros(size, size, dtype=accumulation_dtype(columns.dtype), device=columns.device)
        ops.factor_accumulate_([self.hessian], [columns], [False])
        self._cholesky = None

    def posterior_precision(self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None) -> Tensor:
        """The dense ``(P, P)`` posterior precision in the layers' ``[W | b]`` row-major order."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else prior_precision
        weights = self.layer_weights()
        deltas = self._prior_per_layer(delta)
        per_parameter = torch.cat([d.expand_as(w).flatten() for d, w in zip(deltas, weights, strict=True)])
        scale = self._curvature_scale(self.sigma_noise if sigma_noise is None else sigma_noise)
        return scale * self.hessian + torch.diag(per_parameter)

    def _factor(self) -> Tensor:
        if self._cholesky is None:
            self._cholesky = torch.linalg.cholesky(self.posterior_precision())
        return self._cholesky

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """Twice the log of the Cholesky diagonal, differentiable in δ and σ."""
        factor = torch.linalg.cholesky(self.posterior_precision(prior_precision, sigma_noise))
        return 2 * factor.diagonal().log().sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        jac = _weight_gradients(stats).to(self.hessian.dtype)  # (N, C, P)
        factor = self._factor()
        half = torch.linalg.solve_triangular(factor, jac.transpose(1, 2), upper=False)  # L⁻¹ Jᵀ
        return half.transpose(1, 2) @ half

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        factor = self._factor()
        noise = torch.randn((factor.shape[0], n_samples), dtype=factor.dtype, device=factor.device, generator=generator)
        deviations = torch.linalg.solve_triangular(factor.T, noise, upper=True).T  # covariance P⁻¹
        shapes = [w.shape for w in self.layer_weights()]
        return [
            d.reshape(n_samples, *shape)
            for d, shape in zip(deviations.split(self.layer_sizes(), dim=1), shapes, strict=True)
        ]

    def _curvature_tensors(self) -> list[Tensor]:
        return [self.hessian]

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        self.hessian = tensors[0]
        self._cholesky = None
