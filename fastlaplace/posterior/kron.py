"""Kronecker-factored (K-FAC) Laplace posterior."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import ops
from fastlaplace.curvature import KronCurvature
from fastlaplace.posterior.base import BaseLaplace


class KronLaplace(BaseLaplace):
    """``P_l = kron(G_l, A_l) / (N σ² T) + δ_l I`` per layer, used exactly in its eigenbasis."""

    def _reset_curvature(self) -> None:
        self.curvature = KronCurvature()
        self._eigen = None

    def _update_curvature(self, stats) -> None:
        self.curvature.update(stats)
        self._eigen = None

    def eigendecomposition(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(Q_A, λ_A, Q_G, λ_G)`` per layer, computed once per fit (one batched call)."""
        self._require_fit()
        if self._eigen is None:
            factors = self.curvature.input_factors + self.curvature.output_factors
            values, vectors = ops.batched_eigh(factors)
            count = len(self.layers)
            self._eigen = (vectors[:count], values[:count], vectors[count:], values[count:])
        return self._eigen

    def _scale(self, sigma_noise: Tensor) -> Tensor:
        scale = self._curvature_scale(sigma_noise) / self.curvature.num_data
        return scale.expand(len(self.layers)).to(self.dtype)

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """Σ_l Σ_ij log(s μ_j λ_i + δ_l), differentiable in δ and σ."""
        _, la, _, lg = self.eigendecomposition()
        return ops.kron_logdet(la, lg, self._scale(sigma_noise), prior_precision).sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        qa, la, qg, lg = self.eigendecomposition()
        return ops.kron_predictive_variance(
            [s.inputs for s in stats],
            # The last layer's output Jacobian is the identity: the operator's closed form.
            [None if self.last_layer_only else s.output_grads for s in stats],
            qa,
            la,
            qg,
            lg,
            self._scale(self.sigma_noise),
            self.prior_precision,
            [s.has_bias for s in stats],
            full_covariance=True,
        )

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        qa, la, qg, lg = self.eigendecomposition()
        noise = [
            torch.randn((n_samples, g.shape[0], a.shape[0]), dtype=a.dtype, device=a.device, generator=generator)
            for a, g in zip(qa, qg, strict=True)
        ]
        return ops.kron_solve(qa, la, qg, lg, noise, self._scale(self.sigma_noise), self.prior_precision, -0.5)

    def _curvature_tensors(self) -> list[Tensor]:
        return self.curvature.input_factors + self.curvature.output_factors

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        count = len(self.layers)
        self.curvature.names = [name for name, _ in self.layers]
        self.curvature.input_factors, self.curvature.output_factors = tensors[:count], tensors[count:]
        self.curvature.num_data = num_data
