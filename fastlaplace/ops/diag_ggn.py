"""``torch.ops.fastlaplace.diag_ggn``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_device, check_lengths, check_tensor
from fastlaplace.ops._extension import EXTENSION


def diag_ggn(inputs: Sequence[Tensor], output_grads: Sequence[Tensor], append_ones: Sequence[bool]) -> list[Tensor]:
    """Diagonal GGN ``Σ_n Σ_k (g_nk ∘ g_nk)(a_n ∘ a_n)ᵀ`` of Linear-like layers.

    Args:
        inputs: L tensors ``(N, d_in)``.
        output_grads: L tensors ``(N, K, d_out)`` or ``(N, d_out)``.
        append_ones: whether layer i has a bias.

    Returns:
        L tensors ``(d_out, d_in + b_i)``, float64 for float64 inputs else float32;
        the bias diagonal is the last column.
    """
    count = check_lengths(inputs=inputs, output_grads=output_grads, append_ones=append_ones)
    if count == 0:
        return []
    for i in range(count):
        a = check_tensor(inputs[i], f"inputs[{i}]", 2)
        g = check_tensor(output_grads[i], f"output_grads[{i}]", (2, 3))
        if g.shape[0] != a.shape[0]:
            raise ValueError(f"output_grads[{i}] has {g.shape[0]} samples but inputs[{i}] has {a.shape[0]}")
        check_device([a, g], lambda i=i: [f"inputs[{i}]", f"output_grads[{i}]"])
    check_device(list(inputs), lambda: [f"inputs[{i}]" for i in range(count)])
    impl = torch.ops.fastlaplace.diag_ggn if EXTENSION else reference.diag_ggn
    return impl(list(inputs), list(output_grads), [bool(b) for b in append_ones])


if EXTENSION:

    @torch.library.register_fake("fastlaplace::diag_ggn")
    def _diag_ggn_fake(inputs, output_grads, append_ones):
        return [
            a.new_empty((g.shape[-1], a.shape[1] + int(ones)), dtype=reference.accumulation_dtype(a.dtype))
            for a, g, ones in zip(inputs, output_grads, append_ones, strict=True)
        ]
