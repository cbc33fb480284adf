"""A Kronecker-factored layer whose factors are eigen-truncated: the precision and what is computed from it.

A factor kept as its top eigenpairs (``Q_A`` ``(d_A, k_A)``, λ; ``Q_G`` ``(d_G, k_G)``, μ;
see :mod:`fastlaplace.curvature.big_factors`; a dense factor is the case ``k = d``) gives
the layer's precision

    ``P = Π diag(s λ_i μ_j + δ) Πᵀ + δ (I − Π Πᵀ)``,  ``Π = Q_G ⊗ Q_A``,

the rest of the spectrum taken as zero: on the complement of the kept eigenvectors P is
the prior precision δ. Hence ``P⁻¹ = Π diag(1 / (s λ μ + δ)) Πᵀ + (I − Π Πᵀ) / δ``,
``log det P = Σ_{i, j} log(s λ_i μ_j + δ) + (d_G d_A − k_G k_A) log δ``, and
``P^{-1/2} = Π diag((s λ μ + δ)^{-1/2} − δ^{-1/2}) Πᵀ + I / √δ``.

The functions below take the reciprocal eigenvalues ``1 / (s λ_i μ_j + δ)`` as one
``(k_G, k_A)`` matrix, so that they also serve a dense layer (``k = d``) whose eigenvalues in
the Kronecker eigenbasis are not products (EKFAC's ``s S_ji + δ``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace.reference import damped_eigenvalues


def complement_dimension(qa: Tensor, qg: Tensor) -> int:
    """``d_G d_A − k_G k_A``: the parameters of the layer on which P is δ alone."""
    return qg.shape[0] * qa.shape[0] - qg.shape[1] * qa.shape[1]


def damped_inverse(la: Tensor, lg: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
    """``(k_G, k_A)``: ``1 / (s μ_j λ_i + δ)`` for ``(k_A,)`` λ and ``(k_G,)`` μ, eigenvalues clamped at 0."""
    return damped_eigenvalues(la, lg, scale, delta).reciprocal()


def _last_layer_terms(
    features: Tensor, qa: Tensor, inverse: Tensor, delta: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per sample: ``w_nj = Σ_i ã_ni² inverse_ji``, ``‖ã_n‖²`` and ``‖a_n − Q_A ã_n‖² / δ``.

    ``ã = Q_Aᵀ a`` are the features in A's kept eigenbasis; the last term, the features'
    part outside it, is None for a dense A.
    """
    rotated = features @ qa  # (N, k_A)
    weights = rotated.square() @ inverse.T  # (N, k_G)
    outside = (features - rotated @ qa.T).square().sum(1) / delta if qa.shape[1] < qa.shape[0] else None
    return weights, rotated.square().sum(1), outside


def last_layer_variances(features: Tensor, qa: Tensor, qg: Tensor, inverse: Tensor, delta: Tensor) -> Tensor:
    """``(N, C)`` GLM variances ``J P⁻¹ Jᵀ`` of a last layer (``J = I ⊗ aᵀ``), never forming ``(N, C, C)``.

    ``v_nc = Σ_j Q_G[c, j]² w_nj + (1 − Σ_j Q_G[c, j]²) ‖ã_n‖² / δ + ‖a_n − Q_A ã_n‖² / δ``: one
    GEMM with the factors (the complement terms are left out for dense factors).

    Args:
        features: ``(N, d_A)`` the layer's inputs, with the ones column of a bias.
        qa: ``(d_A, k_A)`` A's kept eigenvectors.
        qg: ``(C, k_G)`` G's kept eigenvectors.
        inverse: ``(k_G, k_A)`` the reciprocal eigenvalues of P in the kept eigenbasis,
            ``1 / (s λ_i μ_j + δ)`` for Kron (:func:`damped_inverse`), ``1 / (s S_ji + δ)`` for EKFAC.
        delta: the prior precision δ (a scalar tensor).
    """
    weights, in_span, outside = _last_layer_terms(features, qa, inverse, delta)
    kept = qg.square()
    variances = weights @ kept.T
    if qg.shape[1] < qg.shape[0]:
        variances = variances + torch.outer(in_span / delta, 1 - kept.sum(1))
    return variances if outside is None else variances + outside.unsqueeze(1)


def last_layer_covariance(features: Tensor, qa: Tensor, qg: Tensor, inverse: Tensor, delta: Tensor) -> Tensor:
    """``(N, C, C)`` GLM covariances of a last layer, with the terms of :func:`last_layer_variances`.

    ``Q_G diag(w_n) Q_Gᵀ + ‖ã_n‖²/δ (I − Q_G Q_Gᵀ) + ‖a_n − Q_A ã_n‖²/δ I``; arguments as there.
    """
    weights, in_span, outside = _last_layer_terms(features, qa, inverse, delta)
    covariance = torch.einsum("cj,nj,dj->ncd", qg, weights, qg)
    if qg.shape[1] < qg.shape[0]:
        complement = -(qg @ qg.T)
        complement.diagonal().add_(1)
        covariance += (in_span / delta).view(-1, 1, 1) * complement
    if outside is not None:
        covariance.diagonal(dim1=1, dim2=2).add_(outside.unsqueeze(1))
    return covariance


def inverse_root_samples(noise: Tensor, qa: Tensor, qg: Tensor, inverse: Tensor, delta: Tensor) -> Tensor:
    """``(n, d_G, d_A)`` draws ``P^{-1/2} z`` of N(0, P⁻¹) from ``(n, d_G, d_A)`` standard normal ``z``.

    ``inverse`` ``(k_G, k_A)`` as in :func:`last_layer_variances`; with square eigenvector
    matrices (nothing truncated) this is ``Q_G [(Q_Gᵀ z Q_A) ⊙ inverse^½] Q_Aᵀ``.
    """
    root_delta = delta.rsqrt()
    excess = inverse.sqrt() - root_delta  # (k_G, k_A)
    return noise * root_delta + qg @ ((qg.T @ noise @ qa) * excess) @ qa.T
