"""``torch.ops.fastlaplace.batched_eigh``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_device, check_square_matrices
from fastlaplace.ops._extension import EXTENSION


def batched_eigh(matrices: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Eigenpairs of symmetric matrices of mixed sizes in one call.

    On the CPU, LAPACK per matrix, small ones side by side on the threads. On CUDA, the
    matrices of at most 112 rows that fit one block's shared memory are diagonalised in one
    launch per dtype, one block per matrix (a Jacobi solver working in double); larger
    ones go to cuSOLVER one by one.

    Args:
        matrices: L float32/float64 tensors ``(d_i, d_i)``; lower triangles are read.

    Returns:
        ``(eigenvalues, eigenvectors)``: L tensors ``(d_i,)`` ascending and L tensors
        ``(d_i, d_i)`` with eigenvectors as columns.

    Raises:
        RuntimeError: if an eigendecomposition fails to converge (NaN/Inf input).
    """
    if len(matrices) == 0:
        return [], []
    check_square_matrices(matrices)
    check_device(list(matrices), lambda: [f"matrices[{i}]" for i in range(len(matrices))])
    impl = torch.ops.fastlaplace.batched_eigh if EXTENSION else reference.batched_eigh
    values, vectors = impl(list(matrices))
    return list(values), list(vectors)


if EXTENSION:

    @torch.library.register_fake("fastlaplace::batched_eigh")
    def _batched_eigh_fake(matrices):
        # LAPACK and cuSOLVER return the eigenvectors column-major.
        return [m.new_empty(m.shape[:1]) for m in matrices], [m.new_empty(m.shape).mT for m in matrices]
