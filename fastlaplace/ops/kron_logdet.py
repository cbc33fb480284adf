"""``torch.ops.fastlaplace.kron_logdet``: its typed wrapper, fake kernel and autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_accumulator, check_device, check_lengths, check_per_layer, check_tensor
from fastlaplace.ops._extension import EXTENSION


def kron_logdet(eigvals_a: Sequence[Tensor], eigvals_g: Sequence[Tensor], scale: Tensor, delta: Tensor) -> Tensor:
    """Per-layer ``log det P_l = Σ_ij log(s_l μ_j λ_i + δ_l)``; differentiable in scale and delta.

    Args:
        eigvals_a: L eigenvalue vectors ``(d_A,)`` of the input factors.
        eigvals_g: L eigenvalue vectors ``(d_G,)`` of the output factors.
        scale: ``(L,)`` non-negative factor scales s_l.
        delta: ``(L,)`` non-negative prior precisions δ_l.

    Returns:
        ``(L,)`` tensor in the eigenvalues' dtype.
    """
    count = check_lengths(eigvals_a=eigvals_a, eigvals_g=eigvals_g)
    for i in range(count):
        for side, vals in (("a", eigvals_a), ("g", eigvals_g)):
            check_tensor(vals[i], f"eigvals_{side}[{i}]", 1)
            check_accumulator(vals[i], f"eigvals_{side}[{i}]")
        if eigvals_a[i].dtype != eigvals_g[i].dtype:
            raise TypeError(f"eigvals_a[{i}] is {eigvals_a[i].dtype} but eigvals_g[{i}] is {eigvals_g[i].dtype}")
    check_per_layer(scale, count, "scale", nonnegative=True)
    check_per_layer(delta, count, "delta", nonnegative=True)
    check_device(
        [*eigvals_a, *eigvals_g, scale, delta],
        lambda: [f"eigvals_{s}[{i}]" for s in "ag" for i in range(count)] + ["scale", "delta"],
    )
    impl = torch.ops.fastlaplace.kron_logdet if EXTENSION else reference.kron_logdet
    return impl(list(eigvals_a), list(eigvals_g), scale, delta)


if EXTENSION:

    @torch.library.register_fake("fastlaplace::kron_logdet")
    def _kron_logdet_fake(eigvals_a, eigvals_g, scale, delta):
        return scale.new_empty((len(eigvals_a),), dtype=eigvals_a[0].dtype)

    def _kron_logdet_setup(ctx, inputs, output):
        eigvals_a, eigvals_g, scale, delta = inputs
        ctx.save_for_backward(scale, delta, *eigvals_a, *eigvals_g)
        ctx.layers = len(eigvals_a)

    def _kron_logdet_backward(ctx, grad):
        # ∂/∂δ_l = Σ 1 / (s μ λ + δ), ∂/∂s_l = Σ μλ / (s μ λ + δ); few ops per layer: the prior
        # optimisation calls this at every step.
        scale, delta, *eigvals = ctx.saved_tensors
        sums = []
        for i in range(ctx.layers):
            products = torch.outer(eigvals[ctx.layers + i].clamp_min(0), eigvals[i].clamp_min(0)).view(-1)
            inverse = torch.addcmul(delta[i], scale[i], products).reciprocal_()
            sums.append(torch.stack([torch.dot(products, inverse), inverse.sum()]))
        sums = grad.unsqueeze(1) * torch.stack(sums).to(scale.dtype)  # (L, 2)
        return [None] * ctx.layers, [None] * ctx.layers, sums[:, 0], sums[:, 1].to(delta.dtype)

    torch.library.register_autograd("fastlaplace::kron_logdet", _kron_logdet_backward, setup_context=_kron_logdet_setup)
