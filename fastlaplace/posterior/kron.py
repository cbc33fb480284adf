"""Kronecker-factored (K-FAC) Laplace posterior."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import ops
from fastlaplace.curvature import DiagCurvature, KronCurvature
from fastlaplace.curvature.products import jacobian_gram
from fastlaplace.curvature.statistics import KRON_LAYERS
from fastlaplace.posterior.base import BaseLaplace


def _damped_inverse(la: Tensor, lg: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
    """``(d_G, d_A)``: ``1 / (s μ_j λ_i + δ)``, eigenvalues clamped at 0."""
    return (scale * torch.outer(lg.clamp_min(0), la.clamp_min(0)) + delta).reciprocal()


class KronLaplace(BaseLaplace):
    """``P_l = kron(G_l, A_l) / (N L_l σ² T) + δ_l I`` per layer, used exactly in its eigenbasis.

    ``kfac_approx`` (``"expand"`` or ``"reduce"``) says how layers applied at several
    locations (Conv2d, Linear on sequences) are factored; see :class:`KronCurvature`.
    Embedding, LayerNorm and BatchNorm layers have no Kronecker factors: their block of P
    is diagonal, ``diag(H_l) / (σ² T) + δ_l`` with the exact GGN diagonal.

    With ``damping=True`` (laplace-torch's option, asked for by name) the prior is added to
    each factor instead: ``P_l = (√s G_l + √δ_l I) ⊗ (√s A_l + √δ_l I)``, s the factor
    scale. It is used consistently by the evidence, the predictive and the samples.
    """

    supports_prior_per_parameter = False  # δ must be constant within a layer's eigenbasis

    def __init__(self, *args, kfac_approx: str = "expand", damping: bool = False, **kwargs) -> None:
        self.kfac_approx = kfac_approx
        self.damping = bool(damping)
        super().__init__(*args, **kwargs)
        self._kron = [i for i, (_, m) in enumerate(self.layers) if isinstance(m, KRON_LAYERS)]
        self._diagonal = [i for i in range(len(self.layers)) if i not in self._kron]

    def _reset_curvature(self) -> None:
        self.curvature = KronCurvature(self.kfac_approx, low_precision_products=self.curvature_dtype is not None)
        self.diagonal_curvature = DiagCurvature()
        self._eigen = None

    def _update_curvature(self, stats) -> None:
        if self._kron:
            self.curvature.update([stats[i] for i in self._kron])
        if self._diagonal:
            self.diagonal_curvature.update([stats[i] for i in self._diagonal])
        self._eigen = None

    def eigendecomposition(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(Q_A, λ_A, Q_G, λ_G)`` per Kronecker-factored layer, computed once per fit (one batched call)."""
        self._require_fit()
        if self._eigen is None:
            factors = self.curvature.input_factors + self.curvature.output_factors
            values, vectors = ops.batched_eigh(factors) if factors else ([], [])
            count = len(self._kron)
            self._eigen = (vectors[:count], values[:count], vectors[count:], values[count:])
        return self._eigen

    def _scale(self, sigma_noise: Tensor) -> Tensor:
        """``(L_kron,)`` factor scales ``1 / (σ² T N L_l)`` of the Kronecker-factored layers."""
        locations = torch.tensor(self.curvature.locations, dtype=self.dtype, device=self.device)
        return self._curvature_scale(sigma_noise) / (self.curvature.num_data * locations)

    def _spectrum(self, prior_precision: Tensor, sigma_noise: Tensor):
        """``(λ_A, λ_G, s, δ)`` per Kron layer such that the eigenvalues of P_l are ``s λ_i μ_j + δ``.

        Damped factors become ``√s λ + √δ`` with ``s = 1, δ = 0``, so that the operators serve both forms.
        """
        _, la, _, lg = self.eigendecomposition()
        scale, delta = self._scale(sigma_noise), prior_precision[self._kron]
        if not self.damping:
            return la, lg, scale, delta
        root_s, root_delta = scale.sqrt(), delta.sqrt()
        la = [r * v.clamp_min(0) + d for r, d, v in zip(root_s, root_delta, la, strict=True)]
        lg = [r * v.clamp_min(0) + d for r, d, v in zip(root_s, root_delta, lg, strict=True)]
        return la, lg, torch.ones_like(scale), torch.zeros_like(delta)

    def _diagonal_precisions(self, prior_precision: Tensor, sigma_noise: Tensor) -> list[Tensor]:
        scale = self._curvature_scale(sigma_noise)
        return [
            scale * h + prior_precision[i]
            for i, h in zip(self._diagonal, self.diagonal_curvature.diagonals, strict=True)
        ]

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """Σ_l Σ_ij log(s μ_j λ_i + δ_l) (+ Σ log of the diagonal blocks), differentiable in δ and σ."""
        total = sum(p.log().sum() for p in self._diagonal_precisions(prior_precision, sigma_noise))
        if not self._kron:
            return total
        la, lg, scale, delta = self._spectrum(prior_precision, sigma_noise)
        if self.damping:  # a product of two factors: log det = d_G Σ log λ' + d_A Σ log μ'
            return total + sum(
                g.numel() * a.log().sum() + a.numel() * g.log().sum() for a, g in zip(la, lg, strict=True)
            )
        return total + ops.kron_logdet(la, lg, scale, delta).sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        qa, _, qg, _ = self.eigendecomposition()
        la, lg, scale, delta = self._spectrum(self.prior_precision, self.sigma_noise)
        kron_stats = [stats[i] for i in self._kron]
        linear = [i for i, s in enumerate(kron_stats) if s.is_plain_linear]
        total = 0
        if linear:
            total = ops.kron_predictive_variance(
                [kron_stats[i].inputs for i in linear],
                # The last layer's output Jacobian is the identity: the operator's closed form.
                [None if self.last_layer_only else kron_stats[i].output_grads for i in linear],
                [qa[i] for i in linear],
                [la[i] for i in linear],
                [qg[i] for i in linear],
                [lg[i] for i in linear],
                scale[linear],
                delta[linear],
                [kron_stats[i].has_bias for i in linear],
                full_covariance=True,
            )
        for i, s in enumerate(kron_stats):
            if not s.is_plain_linear:
                total = total + self._shared_weight_covariance(s, qa[i], la[i], qg[i], lg[i], scale[i], delta[i])
        if self._diagonal:
            precisions = self._diagonal_precisions(self.prior_precision, self.sigma_noise)
            total = total + jacobian_gram([stats[i] for i in self._diagonal], [p.reciprocal() for p in precisions])
        return total

    def _jacobian_cross_covariance(self, stats) -> Tensor:
        """Between samples n, m: ``Σ_ij ã_ni ã_mi B̃_ncj B̃_mdj / (s λ_i μ_j + δ)`` in the eigenbasis."""
        qa, _, qg, _ = self.eigendecomposition()
        la, lg, scale, delta = self._spectrum(self.prior_precision, self.sigma_noise)
        total = 0
        for i, s in enumerate(stats[k] for k in self._kron):
            inverse = _damped_inverse(la[i], lg[i], scale[i], delta[i])
            if s.is_plain_linear:
                inputs = s.patches()[:, 0].to(qa[i].dtype) @ qa[i]  # (N, d_A)
                grads = s.output_grads.to(qa[i].dtype) @ qg[i]  # (N, C, d_G)
                pairs = torch.einsum("ni,mi,ji->nmj", inputs, inputs, inverse)
                total = total + torch.einsum("ncj,nmj,mdj->ncmd", grads, pairs, grads)
            else:
                rotated = self._rotated_jacobian(s, qa[i], qg[i])
                total = total + torch.einsum("ncji,ji,mdji->ncmd", rotated, inverse, rotated)
        if self._diagonal:
            precisions = self._diagonal_precisions(self.prior_precision, self.sigma_noise)
            total = total + jacobian_gram(
                [stats[i] for i in self._diagonal], [p.reciprocal() for p in precisions], joint=True
            )
        return total

    @staticmethod
    def _rotated_jacobian(s, qa, qg) -> Tensor:
        """``(N, C, d_G, d_A)``: ``J̃[c, j, i] = Σ_p (B_p Q_G)[c, j] (Q_Aᵀ u_p)[i]`` of a layer at several locations."""
        b_rot = s.location_grads().to(qa.dtype) @ qg  # (N, C, L, d_G)
        u_rot = s.patches().to(qa.dtype) @ qa  # (N, L, d_A)
        return torch.einsum("nclj,nli->ncji", b_rot, u_rot)

    @staticmethod
    def _shared_weight_covariance(s, qa, la, qg, lg, scale, delta) -> Tensor:
        """``J P⁻¹ Jᵀ`` of a layer applied at several locations: ``J = Σ_p B_p ⊗ u_pᵀ``.

        In the eigenbasis ``J̃[c, j, i] = Σ_p (B_p Q_G)[c, j] (Q_Aᵀ u_p)[i]`` has the size of
        the layer's Jacobian; it is formed one layer at a time.
        """
        rotated = KronLaplace._rotated_jacobian(s, qa, qg)
        return torch.einsum("ncji,ji,neji->nce", rotated, _damped_inverse(la, lg, scale, delta), rotated)

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        deviations: list[Tensor | None] = [None] * len(self.layers)
        if self._kron:
            qa, _, qg, _ = self.eigendecomposition()
            la, lg, scale, delta = self._spectrum(self.prior_precision, self.sigma_noise)
            noise = [
                torch.randn((n_samples, g.shape[0], a.shape[0]), dtype=a.dtype, device=a.device, generator=generator)
                for a, g in zip(qa, qg, strict=True)
            ]
            solved = ops.kron_solve(qa, la, qg, lg, noise, scale, delta, -0.5)
            for i, d in zip(self._kron, solved, strict=True):
                deviations[i] = d
        for i, p in zip(self._diagonal, self._diagonal_precisions(self.prior_precision, self.sigma_noise), strict=True):
            deviations[i] = (
                torch.randn((n_samples, *p.shape), dtype=p.dtype, device=p.device, generator=generator) * p.rsqrt()
            )
        return deviations

    def _curvature_tensors(self) -> list[Tensor]:
        locations = torch.tensor(self.curvature.locations)
        return [
            *self.curvature.input_factors,
            *self.curvature.output_factors,
            locations,
            *self.diagonal_curvature.diagonals,
        ]

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        count = len(self._kron)
        self.curvature.names = [self.layers[i][0] for i in self._kron]
        self.curvature.input_factors = tensors[:count]
        self.curvature.output_factors = tensors[count : 2 * count]
        self.curvature.locations = tensors[2 * count].tolist()
        self.curvature.num_data = num_data
        self.diagonal_curvature.names = [self.layers[i][0] for i in self._diagonal]
        self.diagonal_curvature.diagonals = tensors[2 * count + 1 :]
        self.diagonal_curvature.num_data = num_data
