"""``torch.ops.fastlaplace.kron_predictive_variance``: its typed wrapper, fake kernel and autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_device, check_eigenpairs, check_lengths, check_tensor
from fastlaplace.ops._extension import EXTENSION


def kron_predictive_variance(
    inputs: Sequence[Tensor],
    output_jacobians: Sequence[Tensor | None],
    eigvecs_a: Sequence[Tensor],
    eigvals_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    eigvals_g: Sequence[Tensor],
    scale: Tensor,
    delta: Tensor,
    append_ones: Sequence[bool],
    full_covariance: bool = False,
) -> Tensor:
    """GLM predictive (co)variance ``Σ_l J_l P_l⁻¹ J_lᵀ`` without any ``C x #params`` Jacobian.

    On CUDA all layers go through a few fused launches, which keep every layer's rotated
    Jacobian ``B_l Q_G`` at once: an ``(N, C, Σ_l d_G)`` workspace, the size of the
    Jacobians passed.

    Args:
        inputs: L tensors ``(N, d_in)``, the inputs of each Kron layer.
        output_jacobians: L tensors ``(N, C, d_G)``: the output's Jacobian w.r.t. the
            layer's pre-activation; None for a last layer (identity, ``d_G = C``).
        eigvecs_a: L eigenvector matrices ``(d_A, d_A)`` of the input factors.
        eigvals_a: L eigenvalue vectors ``(d_A,)``.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)`` of the output factors.
        eigvals_g: L eigenvalue vectors ``(d_G,)``.
        scale: ``(L,)`` factor scales.
        delta: ``(L,)`` prior precisions.
        append_ones: whether layer l has a bias.
        full_covariance: ``(N, C, C)`` covariances if True, else ``(N, C)`` variances.

    Returns:
        ``(N, C, C)`` or ``(N, C)`` in the eigenvectors' dtype.
    """
    count = check_eigenpairs(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, scale, delta)
    check_lengths(eigvecs_a=eigvecs_a, inputs=inputs, output_jacobians=output_jacobians, append_ones=append_ones)
    if count == 0:
        raise ValueError("kron_predictive_variance needs at least one layer")
    samples, outputs = None, None
    for i in range(count):
        a = check_tensor(inputs[i], f"inputs[{i}]", 2)
        d_a = a.shape[1] + bool(append_ones[i])
        if d_a != eigvals_a[i].shape[0]:
            raise ValueError(
                f"inputs[{i}] has width {a.shape[1]} (+{int(bool(append_ones[i]))} bias) but "
                f"eigvals_a[{i}] has {eigvals_a[i].shape[0]} entries"
            )
        jac = output_jacobians[i]
        d_g = eigvals_g[i].shape[0]
        if jac is None:
            layer_outputs = d_g
        else:
            check_tensor(jac, f"output_jacobians[{i}]", 3)
            if jac.shape[0] != a.shape[0] or jac.shape[2] != d_g:
                raise ValueError(
                    f"output_jacobians[{i}] must have shape ({a.shape[0]}, C, {d_g}), got {tuple(jac.shape)}"
                )
            layer_outputs = jac.shape[1]
        samples = a.shape[0] if samples is None else samples
        outputs = layer_outputs if outputs is None else outputs
        if a.shape[0] != samples or layer_outputs != outputs:
            raise ValueError(
                f"layer {i} gives {a.shape[0]} samples x {layer_outputs} outputs but layer 0 "
                f"gives {samples} x {outputs}"
            )
    check_device(
        [*inputs, *output_jacobians, *eigvecs_a, scale, delta],
        lambda: (
            [f"{n}[{i}]" for n in ("inputs", "output_jacobians", "eigvecs_a") for i in range(count)]
            + ["scale", "delta"]
        ),
    )
    impl = torch.ops.fastlaplace.kron_predictive_variance if EXTENSION else reference.kron_predictive_variance
    return impl(
        list(inputs),
        list(output_jacobians),
        list(eigvecs_a),
        list(eigvals_a),
        list(eigvecs_g),
        list(eigvals_g),
        scale,
        delta,
        [bool(b) for b in append_ones],
        bool(full_covariance),
    )


if EXTENSION:

    @torch.library.register_fake("fastlaplace::kron_predictive_variance")
    def _kron_predictive_variance_fake(
        inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, scale, delta, append_ones, full_covariance
    ):
        jac = output_jacobians[0]
        outputs = eigvals_g[0].shape[0] if jac is None else jac.shape[1]
        shape = (inputs[0].shape[0], outputs, outputs) if full_covariance else (inputs[0].shape[0], outputs)
        return inputs[0].new_empty(shape, dtype=eigvecs_a[0].dtype)

    def _kron_predictive_variance_setup(ctx, inputs, output):
        ctx.arguments = inputs

    def _kron_predictive_variance_backward(ctx, grad):
        # Gradients w.r.t. the inputs and output Jacobians (what depends on x): recompute the
        # plain-PyTorch form and differentiate it; the posterior's factors are constants.
        a, jac, *rest = ctx.arguments
        jac = [None] * len(a) if jac is None else jac
        with torch.enable_grad():
            a = [t.detach().requires_grad_(True) for t in a]
            jac = [None if t is None else t.detach().requires_grad_(True) for t in jac]
            output = reference.kron_predictive_variance(a, jac, *rest)
            present = [t for t in jac if t is not None]
            grads = iter(torch.autograd.grad(output, a + present, grad, allow_unused=True))
        # Nothing else gets a gradient. The result mirrors the structure the op was called with
        # (a list holding no tensor, such as all-None Jacobians, counts as one leaf).
        result = [
            [None] * len(x) if isinstance(x, (list, tuple)) and any(isinstance(t, Tensor) for t in x) else None
            for x in ctx.arguments
        ]
        result[0] = [next(grads) for _ in a]
        if result[1] is not None:
            result[1] = [None if t is None else next(grads) for t in jac]
        return tuple(result)

    torch.library.register_autograd(
        "fastlaplace::kron_predictive_variance",
        _kron_predictive_variance_backward,
        setup_context=_kron_predictive_variance_setup,
    )
