"""``torch.ops.fastlaplace.factor_accumulate_``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_accumulator, check_device, check_lengths, check_square, check_tensor
from fastlaplace.ops._extension import EXTENSION


def factor_accumulate_(
    factors: Sequence[Tensor],
    inputs: Sequence[Tensor],
    append_ones: Sequence[bool],
    alpha: float = 1.0,
    beta: float = 1.0,
) -> None:
    """In place, for every layer i: ``F_i <- beta F_i + alpha [X_i, 1]ᵀ [X_i, 1]``.

    The bias column is implicit (no concatenated copy) and only the blocks on and above
    the diagonal of each Gram matrix are multiplied. Factors are symmetric: as with BLAS
    ``syrk`` only their upper triangle is read, and the result is exactly symmetric.

    Args:
        factors: L contiguous float32/float64 tensors ``(d_i + b_i, d_i + b_i)``.
        inputs: L tensors ``(N_i, d_i)`` of any floating dtype (bf16/fp16 are
            accumulated in the factor's dtype).
        append_ones: b_i, whether layer i has a bias.
        alpha: scale of the new Gram matrix.
        beta: decay of the old factor; 0 ignores its old content.
    """
    count = check_lengths(factors=factors, inputs=inputs, append_ones=append_ones)
    if count == 0:
        return
    for i in range(count):
        f = check_tensor(factors[i], f"factors[{i}]", 2)
        x = check_tensor(inputs[i], f"inputs[{i}]", 2)
        check_accumulator(f, f"factors[{i}]")
        if not f.is_contiguous():
            raise ValueError(f"factors[{i}] must be contiguous (it is written in place)")
        check_square(f, x.shape[1] + bool(append_ones[i]), f"factors[{i}]")
        check_device([f, x], lambda i=i: [f"factors[{i}]", f"inputs[{i}]"])
    check_device(list(factors), lambda: [f"factors[{i}]" for i in range(count)])
    impl = torch.ops.fastlaplace.factor_accumulate_ if EXTENSION else reference.factor_accumulate_
    impl(list(factors), list(inputs), [bool(b) for b in append_ones], float(alpha), float(beta))


if EXTENSION:

    @torch.library.register_fake("fastlaplace::factor_accumulate_")
    def _factor_accumulate_fake(factors, inputs, append_ones, alpha=1.0, beta=1.0):
        return None
