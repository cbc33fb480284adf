"""Eigendecompositions of Kronecker factors that never hand a LAPACK / cuSOLVER failure to the user."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlaplace import ops

#: the largest side the eigensolvers take (csrc/ops.h kLapackMaxSide): LAPACK's and cuSOLVER's
#: syevd count their 1 + 6d + 2d² workspace entries in a 32-bit int
MAX_EIGH_SIDE = 32766
#: the relative shift of the last retry: ``ε · max(tr F / d, tiny)`` added to the diagonal
SHIFT = 1e-10


def factor_eigh(factors: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``(eigenvalues, eigenvectors)`` of symmetric PSD factors of mixed sizes, in their dtypes.

    A float32 eigensolver can fail to converge on an ill-conditioned factor (exact zero rows
    from dead ReLUs or max-pooling, say). Where ``ops.batched_eigh`` raises, the factors are
    retried in float64, and where that fails too, in float64 with the diagonal shifted by
    :data:`SHIFT` times the mean eigenvalue (taken back off the eigenvalues: the eigenvectors
    are those of a matrix within that shift of F). Non-finite factors still raise.

    Args:
        factors: symmetric ``(d_i, d_i)`` float32 / float64 matrices.

    Returns:
        ``(values, vectors)``: per factor ``(d_i,)`` ascending eigenvalues and ``(d_i, d_i)``
        eigenvectors as columns.
    """
    try:
        return ops.batched_eigh(factors)
    except RuntimeError:
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            raise
    wide = [f.double() for f in factors]
    try:
        values, vectors = ops.batched_eigh(wide)
    except RuntimeError:
        shifts = [SHIFT * max(float(f.diagonal().mean()), torch.finfo(torch.float64).tiny) for f in wide]
        eye = [torch.eye(f.shape[0], dtype=f.dtype, device=f.device) for f in wide]
        values, vectors = ops.batched_eigh([f + s * i for f, s, i in zip(wide, shifts, eye, strict=True)])
        values = [v - s for v, s in zip(values, shifts, strict=True)]
    return (
        [v.to(f.dtype) for v, f in zip(values, factors, strict=True)],
        [q.to(f.dtype) for q, f in zip(vectors, factors, strict=True)],
    )
