"""``torch.ops.fastlaplace.kron_solve``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_device, check_eigenpairs, check_lengths, check_tensor
from fastlaplace.ops._extension import EXTENSION


def kron_solve(
    eigvecs_a: Sequence[Tensor],
    eigvals_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    eigvals_g: Sequence[Tensor],
    rhs: Sequence[Tensor],
    scale: Tensor,
    delta: Tensor,
    exponent: float = -1.0,
) -> list[Tensor]:
    """``P_i^exponent V_i`` per layer with ``P_i = s_i kron(G_i, A_i) + δ_i I``, exactly.

    ``P^p V = Q_G [(Q_Gᵀ V Q_A) ⊘ (s μ_j λ_i + δ)^-p] Q_Aᵀ`` with clamped eigenvalues.

    Args:
        eigvecs_a: L eigenvector matrices ``(d_A, d_A)`` of the input factors A_i.
        eigvals_a: L eigenvalue vectors ``(d_A,)`` of A_i.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)`` of the output factors G_i.
        eigvals_g: L eigenvalue vectors ``(d_G,)`` of G_i.
        rhs: L tensors ``(*, d_G, d_A)`` (leading dimensions are a batch).
        scale: ``(L,)`` non-negative factor scales s_i.
        delta: ``(L,)`` non-negative prior precisions δ_i.
        exponent: power of P (-1 solves, -0.5 for sampling).

    Returns:
        L tensors shaped like ``rhs`` in the eigenvectors' dtype.
    """
    count = check_eigenpairs(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, scale, delta)
    check_lengths(eigvecs_a=eigvecs_a, rhs=rhs)
    if count == 0:
        return []
    for i, v in enumerate(rhs):
        check_tensor(v, f"rhs[{i}]")
        expected = (eigvals_g[i].shape[0], eigvals_a[i].shape[0])
        if v.dim() < 2 or tuple(v.shape[-2:]) != expected:
            raise ValueError(f"rhs[{i}] must have shape (*, {expected[0]}, {expected[1]}), got {tuple(v.shape)}")
    check_device(
        [*eigvecs_a, *eigvals_a, *eigvecs_g, *eigvals_g, *rhs, scale, delta],
        lambda: (
            [f"{n}[{i}]" for n in ("eigvecs_a", "eigvals_a", "eigvecs_g", "eigvals_g", "rhs") for i in range(count)]
            + ["scale", "delta"]
        ),
    )
    impl = torch.ops.fastlaplace.kron_solve if EXTENSION else reference.kron_solve
    return impl(
        list(eigvecs_a), list(eigvals_a), list(eigvecs_g), list(eigvals_g), list(rhs), scale, delta, float(exponent)
    )


if EXTENSION:

    @torch.library.register_fake("fastlaplace::kron_solve")
    def _kron_solve_fake(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent=-1.0):
        return [v.new_empty(v.shape, dtype=qa.dtype) for v, qa in zip(rhs, eigvecs_a, strict=True)]
