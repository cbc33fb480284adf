"""Kronecker-factored (K-FAC) Laplace posterior."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import ops
from fastlaplace.curvature import KronCurvature
from fastlaplace.posterior.base import BaseLaplace


class KronLaplace(BaseLaplace):
    """``P_l = kron(G_l, A_l) / (N L_l σ² T) + δ_l I`` per layer, used exactly in its eigenbasis.

    ``kfac_approx`` (``"expand"`` or ``"reduce"``) says how layers applied at several
    locations (Conv2d, Linear on sequences) are factored; see :class:`KronCurvature`.
    """

    supports_prior_per_parameter = False  # δ must be constant within a layer's eigenbasis

    def __init__(self, *args, kfac_approx: str = "expand", **kwargs) -> None:
        self.kfac_approx = kfac_approx
        super().__init__(*args, **kwargs)

    def _reset_curvature(self) -> None:
        self.curvature = KronCurvature(self.kfac_approx)
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
        """``(L,)`` factor scales ``1 / (σ² T N L_l)``."""
        locations = torch.tensor(self.curvature.locations, dtype=self.dtype, device=self.device)
        return self._curvature_scale(sigma_noise) / (self.curvature.num_data * locations)

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """Σ_l Σ_ij log(s μ_j λ_i + δ_l), differentiable in δ and σ."""
        _, la, _, lg = self.eigendecomposition()
        return ops.kron_logdet(la, lg, self._scale(sigma_noise), prior_precision).sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        qa, la, qg, lg = self.eigendecomposition()
        scale, delta = self._scale(self.sigma_noise), self.prior_precision
        linear = [i for i, s in enumerate(stats) if not s.shares_weights]
        total = 0
        if linear:
            total = ops.kron_predictive_variance(
                [stats[i].inputs for i in linear],
                # The last layer's output Jacobian is the identity: the operator's closed form.
                [None if self.last_layer_only else stats[i].output_grads for i in linear],
                [qa[i] for i in linear],
                [la[i] for i in linear],
                [qg[i] for i in linear],
                [lg[i] for i in linear],
                scale[linear],
                delta[linear],
                [stats[i].has_bias for i in linear],
                full_covariance=True,
            )
        for i, s in enumerate(stats):
            if s.shares_weights:
                total = total + self._shared_weight_covariance(s, qa[i], la[i], qg[i], lg[i], scale[i], delta[i])
        return total

    @staticmethod
    def _shared_weight_covariance(s, qa, la, qg, lg, scale, delta) -> Tensor:
        """``J P⁻¹ Jᵀ`` of a layer applied at several locations: ``J = Σ_p B_p ⊗ u_pᵀ``.

        In the eigenbasis ``J̃[c, j, i] = Σ_p (B_p Q_G)[c, j] (Q_Aᵀ u_p)[i]`` has the size of
        the layer's Jacobian; it is formed one layer at a time.
        """
        b_rot = s.location_grads().to(qa.dtype) @ qg  # (N, C, L, d_G)
        u_rot = s.patches().to(qa.dtype) @ qa  # (N, L, d_A)
        rotated = torch.einsum("nclj,nli->ncji", b_rot, u_rot)
        inverse = (scale * torch.outer(lg.clamp_min(0), la.clamp_min(0)) + delta).reciprocal()
        return torch.einsum("ncji,ji,neji->nce", rotated, inverse, rotated)

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        qa, la, qg, lg = self.eigendecomposition()
        noise = [
            torch.randn((n_samples, g.shape[0], a.shape[0]), dtype=a.dtype, device=a.device, generator=generator)
            for a, g in zip(qa, qg, strict=True)
        ]
        return ops.kron_solve(qa, la, qg, lg, noise, self._scale(self.sigma_noise), self.prior_precision, -0.5)

    def _curvature_tensors(self) -> list[Tensor]:
        locations = torch.tensor(self.curvature.locations)
        return self.curvature.input_factors + self.curvature.output_factors + [locations]

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        count = len(self.layers)
        self.curvature.names = [name for name, _ in self.layers]
        self.curvature.input_factors = tensors[:count]
        self.curvature.output_factors = tensors[count : 2 * count]
        self.curvature.locations = tensors[2 * count].tolist()
        self.curvature.num_data = num_data
