"""``J P⁻¹ Jᵀ`` of a Kronecker-factored layer applied at several locations, in sample chunks of bounded memory."""

from __future__ import annotations

import torch
from torch import Tensor

#: The largest intermediate of one chunk of samples holds at most this many bytes.
ROTATED_JACOBIAN_BYTES = 64 << 20
#: Layers with at most this many locations per output class go through the location kernel
#: (:func:`_through_location_kernel`): it has more flops than the rotated Jacobian up to here,
#: but they are one large GEMM instead of GEMMs with an inner dimension of L (measured ≥ 1.5×
#: faster on ResNet-18's last two stages, 2.4× slower at 6 locations per class).
LOCATIONS_PER_CLASS = 3


def shared_weight_covariance(
    location_grads: Tensor, patches: Tensor, qa: Tensor, qg: Tensor, inverse: Tensor, diagonal: bool = False
) -> Tensor:
    """``(N, C, C)`` ``J P⁻¹ Jᵀ`` of a layer with ``J = Σ_p B_p ⊗ u_pᵀ``, P⁻¹ diagonal in the factors' eigenbasis.

    With ``B̃_p = B_p Q_G``, ``ũ_p = Q_Aᵀ u_p`` and ``W_ji = 1 / (s λ_i μ_j + δ)``, the result is
    ``Σ_ji J̃_cji J̃_eji W_ji`` with ``J̃_c = Σ_p B̃_pc ⊗ ũ_p`` the rotated Jacobian (the size
    of the layer's weight, per class), or equally ``Σ_pqj B̃_pcj B̃_qej K_pqj`` with the
    location kernel ``K_pqj = Σ_i ũ_pi ũ_qi W_ji``. The first costs ``C L d_G d_A``, the
    second ``L² d_A d_G``: late, low-resolution convs (L ≤ :data:`LOCATIONS_PER_CLASS` C)
    take the kernel. Samples go in chunks whose largest intermediate holds at most
    :data:`ROTATED_JACOBIAN_BYTES`.

    Args:
        location_grads: ``(N, C, L, d_G)`` the output Jacobian at every location.
        patches: ``(N, L, d_A)`` the input each location sees (with a bias's ones column).
        qa: ``(d_A, d_A)`` eigenvectors of A.
        qg: ``(d_G, d_G)`` eigenvectors of G.
        inverse: ``(d_G, d_A)`` P⁻¹'s eigenvalues ``1 / (s λ_i μ_j + δ)``.
        diagonal: return the ``(N, C)`` variances alone (no ``C × C`` product).

    Returns:
        ``(N, C, C)``, or ``(N, C)`` with ``diagonal``, in the eigenvectors' dtype.
    """
    n, classes, locations, _ = location_grads.shape
    through_kernel = locations <= LOCATIONS_PER_CLASS * classes
    entries = locations * locations * sum(inverse.shape) if through_kernel else classes * inverse.numel()
    chunk = max(1, ROTATED_JACOBIAN_BYTES // (entries * inverse.element_size()))
    # One buffer for every chunk: a fresh allocation of this size is page-faulted in again each time.
    buffer = None if through_kernel else qa.new_empty(min(chunk, n), classes * inverse.shape[0], inverse.shape[1])
    parts = []
    # Rotated as (n, C, d_G, L): a convolution's gradients are laid out so (location_grads is their
    # transposed view), and the rotated Jacobian's GEMM takes them so: neither layout is copied.
    channel_grads = location_grads.transpose(2, 3)
    for start in range(0, n, chunk):
        grads = qg.T @ channel_grads[start : start + chunk].to(qa.dtype)  # (n, C, d_G, L)
        u = patches[start : start + chunk].to(qa.dtype)
        if through_kernel:
            parts.append(_through_location_kernel(grads, u, qa, inverse, diagonal))
        else:
            parts.append(_through_rotated_jacobian(grads, u, qa, inverse, diagonal, buffer[: grads.shape[0]]))
    return torch.cat(parts)


def _through_rotated_jacobian(
    grads: Tensor, patches: Tensor, qa: Tensor, inverse: Tensor, diagonal: bool, out: Tensor
) -> Tensor:
    """``J̃_c`` formed in ``out`` ``(n, C d_G, d_A)``, scaled in place by ``√W``, then reduced by one batched GEMM.

    ``grads``: the ``(n, C, d_G, L)`` rotated output gradients.

    The patches are rotated before the sum over locations, or the ``(C d_G, d_A)`` sum
    after it, whichever costs fewer flops (``L d_A²`` against ``C d_G d_A²``).
    """
    n, classes, d_g, locations = grads.shape
    grads = grads.reshape(n, classes * d_g, locations)
    if torch.is_grad_enabled() and (grads.requires_grad or patches.requires_grad):  # differentiable: no out= buffers
        jac = grads @ patches @ qa if classes * d_g < locations else grads @ (patches @ qa)
        rotated = jac.view(n, classes, -1) * inverse.sqrt().flatten()
        return rotated.square().sum(-1) if diagonal else rotated @ rotated.transpose(1, 2)
    if classes * d_g < locations:
        torch.matmul(grads @ patches, qa, out=out)
    else:
        torch.bmm(grads, patches @ qa, out=out)
    rotated = out.view(n, classes, -1).mul_(inverse.sqrt().flatten())
    if diagonal:
        return rotated.square_().sum(-1)
    return torch.bmm(rotated, rotated.transpose(1, 2))


def _through_location_kernel(grads: Tensor, patches: Tensor, qa: Tensor, inverse: Tensor, diagonal: bool) -> Tensor:
    """``K_pqj`` for the pairs ``p ≤ q`` (it is symmetric) by one GEMM with ``Wᵀ``, then ``B̃_j K_j B̃_jᵀ`` per feature j.

    ``grads``: the ``(n, C, d_G, L)`` rotated output gradients. The kernel is mirrored into
    ``(n, d_G, L, L)`` matrices (a few MB) so that the contraction is a batched GEMM of
    ``(C, L)`` by ``(L, L)``, not gathers of every gradient pair.
    """
    n, _, d_g, locations = grads.shape
    rotated = (patches.reshape(-1, patches.shape[-1]) @ qa).view(n, locations, -1)  # (n, L, d_A)
    first, second = torch.triu_indices(locations, locations, device=qa.device)
    pairs = ((rotated[:, first] * rotated[:, second]).flatten(0, 1) @ inverse.T).view(n, -1, d_g)  # (n, P, d_G)
    kernel = pairs.new_empty(n, d_g, locations, locations)
    kernel[..., first, second] = pairs.transpose(1, 2)
    kernel[..., second, first] = pairs.transpose(1, 2)
    by_feature = grads.transpose(1, 2)  # (n, d_G, C, L)
    weighted = by_feature @ kernel  # (n, d_G, C, L)
    if diagonal:
        return (weighted * by_feature).sum((1, 3))
    covariance = (weighted @ by_feature.transpose(2, 3)).sum(1)
    return (covariance + covariance.transpose(1, 2)) / 2
