"""``torch.ops.fastlaplace.damped_inverses``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_device, check_per_layer, check_square_matrices
from fastlaplace.ops._extension import EXTENSION


def damped_inverses(matrices: Sequence[Tensor], shifts: Tensor) -> list[Tensor]:
    """``(M_i + s_i I)⁻¹`` of symmetric positive semi-definite matrices of mixed sizes, in one call.

    By Cholesky factorisation; a matrix whose shifted factorisation fails in floating point
    is inverted through its eigendecomposition (eigenvalues clamped at 0) instead.

    Args:
        matrices: L float32/float64 tensors ``(d_i, d_i)``; lower triangles are read.
        shifts: ``(L,)`` positive shifts s_i, on the matrices' device.

    Returns:
        L symmetric tensors ``(d_i, d_i)`` in the matrices' dtypes.

    Raises:
        ValueError: on a non-square or integer matrix, or a shift that is not positive.
        RuntimeError: on NaN or Inf in a matrix.
    """
    count = len(matrices)
    if count == 0:
        return []
    check_square_matrices(matrices)
    check_per_layer(shifts, count, "shifts", nonnegative=False)
    if not bool((shifts > 0).all()):
        raise ValueError(f"shifts must be positive, got {shifts.tolist()}")
    check_device([*matrices, shifts], lambda: [f"matrices[{i}]" for i in range(count)] + ["shifts"])
    if EXTENSION:  # the compiled kernel checks for NaN and Inf itself, in one pass per matrix
        return list(torch.ops.fastlaplace.damped_inverses(list(matrices), shifts))
    for i, m in enumerate(matrices):
        if not bool(torch.isfinite(m).all()):
            raise RuntimeError(f"matrices[{i}] contains NaN or Inf; its inverse is undefined")
    return reference.damped_inverses(list(matrices), shifts)


if EXTENSION:

    @torch.library.register_fake("fastlaplace::damped_inverses")
    def _damped_inverses_fake(matrices, shifts):
        return [m.new_empty(m.shape) for m in matrices]
