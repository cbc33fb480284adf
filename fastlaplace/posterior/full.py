"""Full-covariance Laplace posterior (small models: P x P memory)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import ops
from fastlaplace.posterior.parametric import ParametricLaplace
from fastlaplace.reference import accumulation_dtype


def _weight_gradients(stats) -> Tensor:
    """``(N, K, P)``: each backpropagated column as a gradient w.r.t. all layers' ``[W | b]``.

    With the output Jacobians as columns this is the Jacobian ``J`` itself.
    """
    return torch.cat([s.weight_gradients() for s in stats], dim=-1)


def _posterior_cholesky(precision: Tensor) -> Tensor:
    """The lower Cholesky factor of a ``(P, P)`` posterior precision; a clear error where it is singular."""
    factor, info = torch.linalg.cholesky_ex(precision)
    if not torch.compiler.is_compiling() and bool(info != 0):
        raise ValueError(
            "the posterior precision is singular: the full posterior needs a positive prior precision "
            "in the directions the data do not determine"
        )
    return factor


def _same_key(old: tuple, new: tuple) -> bool:
    return all(torch.equal(a, b) if isinstance(a, Tensor) else a == b for a, b in zip(old, new, strict=True))


class FullLaplace(ParametricLaplace):
    """``P = H / (σ² T) + diag(δ)`` with the dense GGN (or Fisher) H over all covered weights.

    With ``subnetwork_indices`` (indices into the covered parameters in
    ``named_parameters()`` order, as laplace-torch's) the posterior covers those
    parameters alone; the others stay at θ*.
    """

    def __init__(self, *args, subnetwork_indices: Tensor | None = None, **kwargs) -> None:
        self.subnetwork_indices = None if subnetwork_indices is None else torch.as_tensor(subnetwork_indices)
        super().__init__(*args, **kwargs)
        self._selected = None
        if self.subnetwork_indices is not None:
            total = sum(self.layer_sizes())
            if self.subnetwork_indices.is_floating_point() or self.subnetwork_indices.is_complex():
                raise TypeError(f"subnetwork_indices must be integers, got {self.subnetwork_indices.dtype}")
            indices = self.subnetwork_indices.to(self.device).long()
            if indices.dim() != 1 or indices.numel() == 0 or indices.unique().numel() != indices.numel():
                raise ValueError("subnetwork_indices must be a non-empty 1-D tensor of distinct indices")
            if int(indices.min()) < 0 or int(indices.max()) >= total:
                raise ValueError(
                    f"subnetwork_indices must lie in [0, {total}), got [{int(indices.min())}, {int(indices.max())}]"
                )
            # Positions in the [W | b] row-major order of the parameters chosen in named_parameters() order.
            positions = torch.cat(
                [m.flatten() for m in self._from_parameter_order(torch.arange(total, device=self.device))]
            )
            self._selected = torch.argsort(positions)[indices].sort().values

    def _columns(self, gradients: Tensor) -> Tensor:
        return gradients if self._selected is None else gradients[..., self._selected]

    def _reset_curvature(self) -> None:
        self.hessian: Tensor | None = None
        self._cholesky = None

    def _update_curvature(self, stats, new_batch: bool = True) -> None:
        columns = self._columns(_weight_gradients(stats)).flatten(0, 1)  # (N*K, P)
        if self.hessian is None:
            size = columns.shape[1]
            self.hessian = torch.zeros(size, size, dtype=accumulation_dtype(columns.dtype), device=columns.device)
        ops.factor_accumulate_([self.hessian], [columns], [False])
        self._cholesky = None

    def _checked_prior(self, value: float | Tensor, edited: bool = False) -> Tensor:
        """The checked prior precision; a zero one must leave the fitted posterior precision non-singular."""
        value = super()._checked_prior(value, edited)
        if self._fitted and not torch.compiler.is_compiling() and not bool((value.detach() > 0).all()):
            _posterior_cholesky(self.posterior_precision(value.detach()))
        return value

    def _prior_vector(self, delta: Tensor) -> Tensor:
        """The prior precision of every covered parameter, ``[W | b]`` row-major order."""
        return self._columns(self._prior_diagonal(delta))

    def _theta(self) -> Tensor:
        return self._columns(torch.cat([w.flatten() for w in self.layer_weights()]))

    def scatter(self, prior_precision: Tensor) -> Tensor:
        """``(θ* − μ_0)ᵀ P_0 (θ* − μ_0)`` over the covered parameters."""
        return (self._prior_vector(prior_precision) * (self._theta() - self.prior_mean).square()).sum()

    def log_det_prior(self, prior_precision: Tensor) -> Tensor:
        """The log-determinant of the prior precision of the covered parameters."""
        return self._prior_vector(prior_precision).log().sum()

    def posterior_precision(self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None) -> Tensor:
        """The dense ``(P, P)`` posterior precision in the layers' ``[W | b]`` row-major order."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else prior_precision
        scale = self._curvature_scale(self.sigma_noise if sigma_noise is None else sigma_noise)
        return scale * self.hessian + torch.diag(self._prior_vector(delta))

    def _factor(self) -> Tensor:
        # Cached for the values of the prior, noise, temperature and data it was computed
        # with (values, not tensor identities: a tensor changed in place keeps its address).
        key = (self.prior_precision.detach().clone(), self.sigma_noise.clone(), self.temperature, self.num_data)
        if self._cholesky is None or not _same_key(self._cholesky[0], key):
            self._cholesky = (key, _posterior_cholesky(self.posterior_precision()))
        return self._cholesky[1]

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """Twice the log of the Cholesky diagonal, differentiable in δ and σ."""
        factor = _posterior_cholesky(self.posterior_precision(prior_precision, sigma_noise))
        return 2 * factor.diagonal().log().sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        jac = self._columns(_weight_gradients(stats)).to(self.hessian.dtype)  # (N, C, P)
        # One right-hand side matrix: a batched solve would copy the factor once per sample.
        half = torch.linalg.solve_triangular(self._factor(), jac.flatten(0, 1).T, upper=False)  # L⁻¹ Jᵀ
        half = half.T.view(jac.shape[0], jac.shape[1], -1)
        return half @ half.transpose(1, 2)

    def _jacobian_cross_covariance(self, stats) -> Tensor:
        jac = self._columns(_weight_gradients(stats)).to(self.hessian.dtype)  # (N, C, P)
        half = torch.linalg.solve_triangular(self._factor(), jac.flatten(0, 1).T, upper=False)  # L⁻¹ Jᵀ
        return (half.T @ half).view(*jac.shape[:2], *jac.shape[:2])

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        factor = self._factor()
        noise = torch.randn((factor.shape[0], n_samples), dtype=factor.dtype, device=factor.device, generator=generator)
        covered = torch.linalg.solve_triangular(factor.T, noise, upper=True).T  # covariance P⁻¹
        weights = self.layer_weights()
        deviations = covered.new_zeros(n_samples, sum(w.numel() for w in weights))
        deviations[:, slice(None) if self._selected is None else self._selected] = covered
        return [
            d.reshape(n_samples, *w.shape)
            for d, w in zip(deviations.split(self.layer_sizes(), dim=1), weights, strict=True)
        ]

    def _curvature_tensors(self) -> list[Tensor]:
        return [self.hessian]

    def _check_curvature_values(self, tensors: list[Tensor]) -> None:
        super()._check_curvature_values(tensors)
        if any(t.dim() != 2 or bool((t.diagonal() < 0).any()) for t in tensors):
            raise ValueError("the state's curvature must be a square matrix with a non-negative diagonal")

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        self.hessian = tensors[0]
        self._cholesky = None
