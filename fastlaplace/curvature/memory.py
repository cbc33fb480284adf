"""Size checks before the large allocations of a fit or a predictive, so that they fail with a clear message.

A dense Kronecker factor of a 50k-output layer, the ``(N, C, C − 1)`` Hessian-root columns
of a 50k-class softmax or an ``(N, C, C)`` predictive covariance can each need tens of GB;
without a check the allocation fails late (out of memory) or inside LAPACK. Every such
allocation is estimated first and refused above :data:`MEMORY_LIMIT_GIB`.
"""

from __future__ import annotations

import math

import torch

#: the largest single allocation (GiB) the fit and the predictive make before refusing; set it to allow more
MEMORY_LIMIT_GIB = 8.0


class AllocationTooLargeError(MemoryError):
    """An allocation was refused before it was made: it would exceed :data:`MEMORY_LIMIT_GIB`."""


def check_allocation(what: str, shape: tuple[int, ...], dtype: torch.dtype, remedy: str) -> None:
    """Refuse an allocation of ``shape`` elements of ``dtype`` larger than :data:`MEMORY_LIMIT_GIB`.

    Args:
        what: what would be allocated, naming its layer (it starts the message).
        shape: the tensor's shape.
        dtype: its element type.
        remedy: the option that avoids the allocation (it ends the message).

    Raises:
        AllocationTooLargeError: with ``what``, the size in GiB, the limit and ``remedy``.
    """
    gib = math.prod(shape) * torch.empty((), dtype=dtype).element_size() / 2**30
    if gib > MEMORY_LIMIT_GIB:
        raise AllocationTooLargeError(
            f"{what} would need {gib:.1f} GiB ({tuple(shape)} {dtype}), more than "
            f"fastlaplace.curvature.memory.MEMORY_LIMIT_GIB = {MEMORY_LIMIT_GIB:g}; {remedy}"
        )
