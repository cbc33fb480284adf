"""Low-rank Laplace posterior: the top eigenpairs of the GGN plus the prior, used through Woodbury."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fastlaplace import distributed
from fastlaplace.curvature.products import ggn_matmul, jacobian_gram, jacobian_matmul
from fastlaplace.posterior.parametric import ParametricLaplace
from fastlaplace.reference import accumulation_dtype

#: subspace iterations of the randomized sketch: fit() reads the data 1 + this many times
POWER_ITERATIONS = 2
#: directions sketched beyond the rank kept (accuracy of the top eigenpairs)
OVERSAMPLING = 10


def nystrom_eigenpairs(basis: Tensor, sketch: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of a PSD matrix H from its Nyström sketch (Tropp et al. 2017, stabilised).

    Args:
        basis: ``(P, s)`` orthonormal directions Ω.
        sketch: ``(P, s)`` the product ``H Ω``.
        rank: number of eigenpairs kept (at most s).

    Returns:
        ``(U, λ)``: ``(P, rank)`` orthonormal eigenvectors and ``(rank,)`` eigenvalues ≥ 0, descending.
    """
    shift = basis.shape[0] ** 0.5 * torch.finfo(sketch.dtype).eps * torch.linalg.matrix_norm(sketch)
    if shift == 0:  # H Ω = 0: nothing to resolve
        return basis[:, :rank], sketch.new_zeros(rank)
    shifted = sketch + shift * basis
    core = basis.T @ shifted
    factor = torch.linalg.cholesky(0.5 * (core + core.T))
    root = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # H_ν = root rootᵀ
    vectors, singular, _ = torch.linalg.svd(root, full_matrices=False)
    return vectors[:, :rank], (singular[:rank].square() - shift).clamp_min(0)


class LowRankLaplace(ParametricLaplace):
    """``P = U diag(λ) Uᵀ / (σ² T) + diag(δ)`` with ``(U, λ)`` the top ``low_rank`` eigenpairs of H.

    H is the GGN (or Fisher, by ``curvature_mode``) of the summed loss. Its eigenpairs come
    from a randomized Nyström sketch with :data:`POWER_ITERATIONS` subspace iterations:
    fit() reads the loader ``1 + POWER_ITERATIONS`` times (it must be re-iterable) and each
    pass multiplies H by ``low_rank +`` :data:`OVERSAMPLING` directions using the layer
    statistics alone: no Jacobian and no ``P × P`` matrix is formed. The prior may be a
    scalar, per layer or per parameter; every product with P⁻¹ goes through the Woodbury
    identity with the ``k × k`` matrix ``K = I + Wᵀ D⁻¹ W``, ``W = U diag(λ / (σ² T))^½``.
    laplace-torch's LowRankLaplace uses the eigenpairs of the Hessian; these are the GGN's.
    Under ``torch.distributed`` each rank passes its shard and the sketches are summed.
    """

    def __init__(self, *args, low_rank: int = 10, **kwargs) -> None:
        if isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1:
            raise ValueError(f"low_rank must be a positive integer, got {low_rank!r}")
        self.low_rank = low_rank
        super().__init__(*args, **kwargs)

    def _reset_curvature(self) -> None:
        self.eigenvectors: Tensor | None = None  # (P, k)
        self.eigenvalues: Tensor | None = None  # (k,)
        self._basis: Tensor | None = None  # (P, s) the directions of the current pass
        self._sketch: Tensor | None = None  # (P, s) H times them

    def fit(self, loader: Iterable, override: bool = True, progress_bar: bool | None = None) -> None:
        """Sketch the curvature over a re-iterable loader of ``(x, y)`` batches (see the class).

        Raises:
            ValueError: with ``override=False`` (eigenpairs do not add up over data sets), or
                for a loader that can be iterated only once.
        """
        if not override:
            raise ValueError(
                "a low-rank posterior cannot add data to an earlier fit (eigenpairs are not additive); "
                "fit all the data at once with override=True"
            )
        if iter(loader) is loader:
            raise ValueError(
                "the low-rank fit reads the data several times: pass a DataLoader or a list, not an iterator"
            )
        with self._unchanged_on_failure():
            self._reset_curvature()
            self.loss, self.num_data = 0.0, 0
            self._fit_pass(loader, progress_bar, self._pass_generator())
            # Under torch.distributed each rank sketches its shard: sketches, losses and counts add up.
            totals = torch.tensor([self.loss, float(self.num_data)], dtype=torch.float64)
            distributed.all_reduce_([self._sketch, totals])
            loss, num_data = float(totals[0]), int(totals[1])
            for _ in range(POWER_ITERATIONS):
                self._basis, self._sketch = torch.linalg.qr(self._sketch).Q, None
                self._fit_pass(loader, progress_bar, self._pass_generator())
                distributed.all_reduce_([self._sketch])
            self.loss, self.num_data = loss, num_data
            rank = min(self.low_rank, self._basis.shape[1])
            self.eigenvectors, self.eigenvalues = nystrom_eigenpairs(self._basis, self._sketch, rank)
            self._basis = self._sketch = None
            self._mean = self._current_weights()
            self._fitted = True

    def _pass_generator(self) -> torch.Generator:
        # The same sampled labels in every pass (curvature_mode="mc"), so that all passes see one H.
        return torch.Generator(device=self.device).manual_seed(0)

    def _update_curvature(self, stats, new_batch: bool = True) -> None:
        if self._basis is None:
            total = sum(self.layer_sizes())
            dtype = accumulation_dtype(self.dtype)
            generator = torch.Generator(device=self.device).manual_seed(0)
            start = torch.randn(
                total, min(self.low_rank + OVERSAMPLING, total), dtype=dtype, device=self.device, generator=generator
            )
            self._basis = torch.linalg.qr(start).Q
        products = ggn_matmul(stats, self._layer_matrices(self._basis.T))
        product = torch.cat([p.flatten(1) for p in products], dim=1).T
        self._sketch = product if self._sketch is None else self._sketch + product

    def _layer_matrices(self, vectors: Tensor) -> list[Tensor]:
        """``(*, P)`` in ``[W | b]`` row-major order → per layer ``(*, d_out, d_A)``."""
        parts = vectors.split(self.layer_sizes(), dim=-1)
        return [p.unflatten(-1, w.shape) for p, w in zip(parts, self.layer_weights(), strict=True)]

    def _woodbury(self, prior_precision: Tensor, sigma_noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(D, W, L)``: ``(P,)`` prior diagonal, ``(P, k)`` ``W`` and the Cholesky factor of K."""
        prior = self._prior_diagonal(prior_precision).to(self.eigenvectors.dtype)
        if not torch.compiler.is_compiling() and not bool((prior.detach() > 0).all()):
            raise ValueError("the low-rank posterior needs a positive prior precision for every parameter")
        scale = self._curvature_scale(sigma_noise).to(prior.dtype)
        w = self.eigenvectors * (scale * self.eigenvalues).sqrt()
        core = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ (w / prior.unsqueeze(1))
        return prior, w, torch.linalg.cholesky(core)

    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """``Σ log δ_p + log det K``, differentiable in δ and σ."""
        prior, _, factor = self._woodbury(prior_precision, sigma_noise)
        return prior.log().sum() + 2 * factor.diagonal().log().sum()

    def _jacobian_covariance(self, stats) -> Tensor:
        """``J D⁻¹ Jᵀ − (J D⁻¹ W) K⁻¹ (J D⁻¹ W)ᵀ`` without forming J."""
        prior, w, factor = self._woodbury(self.prior_precision, self.sigma_noise)
        prior_part = jacobian_gram(stats, self._layer_matrices(prior.reciprocal()))
        projected = jacobian_matmul(stats, self._layer_matrices((w / prior.unsqueeze(1)).T))  # (N, C, k)
        half = torch.linalg.solve_triangular(factor, projected.transpose(1, 2), upper=False)
        return prior_part - half.transpose(1, 2) @ half

    def _jacobian_cross_covariance(self, stats) -> Tensor:
        prior, w, factor = self._woodbury(self.prior_precision, self.sigma_noise)
        prior_part = jacobian_gram(stats, self._layer_matrices(prior.reciprocal()), joint=True)
        projected = jacobian_matmul(stats, self._layer_matrices((w / prior.unsqueeze(1)).T))  # (N, C, k)
        half = torch.linalg.solve_triangular(factor, projected.flatten(0, 1).T, upper=False)
        return prior_part - (half.T @ half).view(prior_part.shape)

    def _sample_deviations(self, n_samples: int, generator: torch.Generator | None) -> list[Tensor]:
        # P⁻¹ = D^-½ (I + V Vᵀ)⁻¹ D^-½ with V = D^-½ W; (I + V Vᵀ)^-½ acts on V's column space only.
        prior, w, _ = self._woodbury(self.prior_precision, self.sigma_noise)
        root = prior.sqrt().unsqueeze(1)
        v = w / root
        values, vectors = torch.linalg.eigh((v.T @ v).double())  # k × k: float64 converges where float32 may not
        values, vectors = values.to(v.dtype), vectors.to(v.dtype)
        keep = values > values.max().clamp_min(0) * torch.finfo(values.dtype).eps * v.shape[1]
        basis = (v @ vectors[:, keep]) / values[keep].sqrt()
        noise = torch.randn((v.shape[0], n_samples), dtype=v.dtype, device=v.device, generator=generator)
        noise = noise + basis @ (((1 + values[keep]).rsqrt() - 1).unsqueeze(1) * (basis.T @ noise))
        return self._layer_matrices((noise / root).T)

    def _curvature_tensors(self) -> list[Tensor]:
        return [self.eigenvectors, self.eigenvalues]

    def _check_curvature_values(self, tensors: list[Tensor]) -> None:
        super()._check_curvature_values(tensors)
        if len(tensors) != 2 or bool((tensors[1] < 0).any()):
            raise ValueError("the state's low-rank curvature must be (eigenvectors, non-negative eigenvalues)")

    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        self.eigenvectors, self.eigenvalues = tensors
