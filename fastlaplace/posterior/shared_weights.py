"""``J P⁻¹ Jᵀ`` of a Kronecker-factored layer applied at several locations, in sample chunks of bounded memory."""

from __future__ import annotations

import torch
from torch import Tensor

#: The rotated Jacobian of one chunk of samples, ``(n, C, d_G, d_A)``, holds at most this many bytes.
ROTATED_JACOBIAN_BYTES = 64 << 20


def shared_weight_covariance(
    location_grads: Tensor, patches: Tensor, qa: Tensor, qg: Tensor, inverse: Tensor
) -> Tensor:
    """``(N, C, C)`` ``J P⁻¹ Jᵀ`` of a layer with ``J = Σ_p B_p ⊗ u_pᵀ``, P⁻¹ diagonal in the factors' eigenbasis.

    In the eigenbasis ``J̃[c, j, i] = Σ_p (B_p Q_G)[c, j] (Q_Aᵀ u_p)[i]`` has the size of the
    layer's Jacobian; it is formed for a chunk of samples at a time, at most
    :data:`ROTATED_JACOBIAN_BYTES` of it, and reduced to ``Σ_ji J̃_c J̃_e / (s λ_i μ_j + δ)``.

    Args:
        location_grads: ``(N, C, L, d_G)`` the output Jacobian at every location.
        patches: ``(N, L, d_A)`` the input each location sees (with a bias's ones column).
        qa: ``(d_A, d_A)`` eigenvectors of A.
        qg: ``(d_G, d_G)`` eigenvectors of G.
        inverse: ``(d_G, d_A)`` P⁻¹'s eigenvalues ``1 / (s λ_i μ_j + δ)``.

    Returns:
        ``(N, C, C)`` in the eigenvectors' dtype.
    """
    n, classes = location_grads.shape[:2]
    per_sample = classes * inverse.numel() * inverse.element_size()
    chunk = max(1, ROTATED_JACOBIAN_BYTES // per_sample)
    parts = []
    for start in range(0, n, chunk):
        b_rot = location_grads[start : start + chunk].to(qa.dtype) @ qg  # (n, C, L, d_G)
        u_rot = patches[start : start + chunk].to(qa.dtype) @ qa  # (n, L, d_A)
        rotated = torch.einsum("nclj,nli->ncji", b_rot, u_rot)
        parts.append(torch.einsum("ncji,ji,neji->nce", rotated, inverse, rotated))
    return torch.cat(parts)
