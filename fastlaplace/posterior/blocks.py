"""Closed forms of the Kron posterior's blocks for layers without two dense Kronecker factors.

Embedding: ``P = kron(diag(s c), G) + δ`` has the eigenbasis ``I ⊗ Q_G`` (no V × V matrix):
its eigenvalues ``s c_v μ_j + δ`` are given as a ``(V, d)`` table of their reciprocals.
Norm layers: one ``(k, k)`` precision per feature (k = 2 for ``(γ_i, β_i)``, 1 for γ alone),
inverted, factored and log-determined in closed form; a grouped Conv2d: one per output
channel (k its filter's weights, and bias), through batched Cholesky factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace.curvature.statistics import LayerStatistics


def embedding_jacobian_covariance(s: LayerStatistics, q_g: Tensor, inverse: Tensor, joint: bool = False) -> Tensor:
    """``J P⁻¹ Jᵀ`` of an embedding table, ``J = Σ_t e_{v_t} ⊗ B_t`` per sample.

    ``Σ_{t,t'} [v_t = v_t'] Σ_j (B_t q_j)(B_t' q_j)ᵀ / (s c_{v_t} μ_j + δ)``: the Jacobians are
    summed per distinct (sample, token) pair first, then rotated by ``Q_G``.

    Args:
        s: the layer's output-Jacobian statistics: token ids and ``(N, C[, T], d)`` Jacobians.
        q_g: ``(d, d)`` eigenvectors of G.
        inverse: ``(V, d)`` reciprocal eigenvalues ``1 / (s c_v μ_j + δ)`` of P.
        joint: between every pair of samples instead of each sample with itself.

    Returns:
        ``(N, C, C)``, or ``(N, C, N, C)`` with ``joint``.
    """
    samples, tokens, sums = s.token_pairs(q_g.dtype)  # (P,), (P,), (P, C, d)
    rotated = sums @ q_g
    n = s.inputs.shape[0]
    if not joint:
        per_pair = torch.einsum("pcj,pj,pej->pce", rotated, inverse[tokens], rotated)
        return per_pair.new_zeros(n, *per_pair.shape[1:]).index_add(0, samples, per_pair)
    present, row = torch.unique(tokens, return_inverse=True)
    table = rotated.new_zeros(present.numel(), n, *rotated.shape[1:])  # (U, N, C, d): zero where absent
    table = table.index_put((row, samples), rotated)  # the pairs are distinct: no entry is written twice
    return torch.einsum("uncj,uj,umej->ncme", table, inverse[present], table)


def embedding_inverse_root(noise: Tensor, q_g: Tensor, inverse: Tensor) -> Tensor:
    """``P^{-1/2} z`` for ``(n, V, d)`` standard normal ``z``: ``[(z Q_G) ⊙ inverse^{1/2}] Q_Gᵀ``, ``(n, V, d)``."""
    return ((noise @ q_g) * inverse.sqrt()) @ q_g.T


def unitwise_logdet(precision: Tensor) -> Tensor:
    """``Σ_i log det P_i`` of ``(d, k, k)`` blocks, a scalar (-inf where a block is not positive definite)."""
    if precision.shape[-1] > 2:
        factor, info = torch.linalg.cholesky_ex(precision)
        if bool((info > 0).any()):
            return precision.new_tensor(-torch.inf)
        return 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum()
    return _determinant(precision).log().sum()


def unitwise_inverse(precision: Tensor) -> Tensor:
    """``(d, k, k)`` inverses of ``(d, k, k)`` blocks: ``1 / a``, the adjugate over the determinant, or Cholesky's."""
    if precision.shape[-1] > 2:
        return torch.cholesky_inverse(_cholesky(precision))
    if precision.shape[-1] == 1:
        return precision.reciprocal()
    a, b, c = precision[:, 0, 0], precision[:, 0, 1], precision[:, 1, 1]
    adjugate = torch.stack([c, -b, -b, a], dim=-1).view(-1, 2, 2)
    return adjugate / _determinant(precision)[:, None, None]


def unitwise_inverse_root(precision: Tensor, noise: Tensor) -> Tensor:
    """``L⁻ᵀ z`` with ``P_i = L Lᵀ`` (closed-form Cholesky), so that its covariance is ``P_i⁻¹``.

    Args:
        precision: ``(d, k, k)`` blocks.
        noise: ``(n, d, k)`` standard normal draws.

    Returns:
        ``(n, d, k)``.
    """
    if precision.shape[-1] > 2:
        factor = _cholesky(precision)  # (d, k, k)
        return torch.linalg.solve_triangular(factor.mT, noise.permute(1, 2, 0), upper=True).permute(2, 0, 1)
    a = precision[:, 0, 0]
    if precision.shape[-1] == 1:
        return noise * a.rsqrt().unsqueeze(-1)
    l11, l21 = a.sqrt(), precision[:, 1, 0] / a.sqrt()
    l22 = (_determinant(precision) / a).sqrt()  # √(c − b² / a)
    second = noise[..., 1] / l22
    first = (noise[..., 0] - l21 * second) / l11
    return torch.stack([first, second], dim=-1)


def unitwise_jacobian_covariance(s: LayerStatistics, inverse: Tensor, joint: bool = False) -> Tensor:
    """``Σ_i w_ni P_i⁻¹ w_niᵀ`` from the per-sample Jacobians ``w_ni`` (``(C, k)``) of each feature's pair.

    Args:
        s: the layer's output-Jacobian statistics.
        inverse: ``(d, k, k)`` inverse blocks.
        joint: between every pair of samples instead of each sample with itself.

    Returns:
        ``(N, C, C)``, or ``(N, C, N, C)`` with ``joint``.
    """
    jac = s.weight_gradients().to(inverse.dtype).unflatten(2, (inverse.shape[0], -1))  # (N, C, d, k)
    return torch.einsum("ncia,iab,meib->ncme" if joint else "ncia,iab,neib->nce", jac, inverse, jac)


def _cholesky(precision: Tensor) -> Tensor:
    """``(d, k, k)`` lower Cholesky factors; a block that is not positive definite is refused by name."""
    factor, info = torch.linalg.cholesky_ex(precision)
    if bool((info > 0).any()):
        raise ValueError(
            "a grouped Conv2d's per-channel precision block is not positive definite (a prior precision of 0 where "
            "the data do not determine every filter weight): use a positive prior_precision"
        )
    return factor


def _determinant(precision: Tensor) -> Tensor:
    """``(d,)`` determinants of ``(d, k, k)`` symmetric blocks, k = 1 or 2."""
    if precision.shape[-1] == 1:
        return precision[:, 0, 0]
    return precision[:, 0, 0] * precision[:, 1, 1] - precision[:, 0, 1].square()
