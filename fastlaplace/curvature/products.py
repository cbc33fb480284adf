"""Products with the layers' Jacobians and the GGN of one batch, from its layer statistics.

A layer's columns ``g_nk`` and inputs ``u_n`` (:class:`LayerStatistics`) define the
per-sample "Jacobian" ``J_nk = Σ_p g_nkp ⊗ u_npᵀ`` w.r.t. its ``[W | b]`` (summed over the
locations p a weight is applied at). With the output Jacobians as columns this is the
network Jacobian; with the curvature columns, ``Σ_nk J_nkᵀ J_nk`` is the batch's GGN.
None of the functions below forms ``J`` for a Linear layer applied once per sample; the
layers without Kronecker factors (Embedding, LayerNorm, BatchNorm) use their per-sample
gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace.curvature.layout import weight_shape
from fastlaplace.curvature.statistics import LayerStatistics


def jacobian_matmul(statistics: Sequence[LayerStatistics], directions: Sequence[Tensor]) -> Tensor:
    """``Σ_l J_l V_l``: every column's directional derivative along each direction.

    Args:
        statistics: one entry per layer.
        directions: per layer ``(j, d_out, d_A)``: j directions in ``[W | b]`` matrix form.

    Returns:
        ``(N, K, j)``.
    """
    total = 0
    for s, v in zip(statistics, directions, strict=True):
        if not s.has_kron_factors:
            total = total + s.weight_gradients().to(v.dtype) @ v.flatten(1).T
            continue
        grads, inputs = s.location_grads().to(v.dtype), s.patches().to(v.dtype)  # (N, K, L, o), (N, L, a)
        n, k, locations, d_out = grads.shape
        # Every direction applied to every patch as one GEMM: (N L, a) x (a, j o).
        moved = (inputs.reshape(-1, inputs.shape[-1]) @ v.reshape(-1, v.shape[-1]).T).view(n, locations, -1, d_out)
        moved = moved.permute(0, 1, 3, 2).reshape(n, locations * d_out, -1)  # (N, L o, j)
        total = total + torch.bmm(grads.reshape(n, k, locations * d_out), moved)
    return total


def jacobian_transpose_matmul(statistics: Sequence[LayerStatistics], coefficients: Tensor) -> list[Tensor]:
    """``J_lᵀ c`` per layer: the columns combined with ``coefficients``, as gradients.

    Args:
        statistics: one entry per layer.
        coefficients: ``(N, K, j)``.

    Returns:
        Per layer ``(j, d_out, d_A)``: ``Σ_nk c_nkj J_nk``.
    """
    result = []
    for s in statistics:
        if not s.has_kron_factors:
            jac = s.weight_gradients().to(coefficients.dtype)
            result.append(torch.einsum("nkj,nkp->jp", coefficients, jac).unflatten(1, (weight_shape(s.module)[0], -1)))
            continue
        grads = s.location_grads().to(coefficients.dtype)
        inputs = s.patches().to(coefficients.dtype)
        n, k, locations, d_out = grads.shape
        combined = torch.bmm(coefficients.transpose(1, 2), grads.reshape(n, k, -1))  # (N, j, L o)
        combined = combined.view(n, -1, locations, d_out).permute(1, 3, 0, 2).reshape(-1, n * locations)
        # (j o, N L) x (N L, a): one GEMM over all samples and locations.
        result.append((combined @ inputs.reshape(n * locations, -1)).view(-1, d_out, inputs.shape[-1]))
    return result


def ggn_matmul(statistics: Sequence[LayerStatistics], directions: Sequence[Tensor]) -> list[Tensor]:
    """The batch's GGN (curvature columns) times directions: ``Σ_nk J_nkᵀ (J_nk V)``.

    Args:
        statistics: one entry per layer, with curvature columns as ``output_grads``.
        directions: per layer ``(j, d_out, d_A)``.

    Returns:
        Per layer ``(j, d_out, d_A)``.
    """
    return jacobian_transpose_matmul(statistics, jacobian_matmul(statistics, directions))


def jacobian_gram(
    statistics: Sequence[LayerStatistics],
    weights: Sequence[Tensor],
    joint: bool = False,
    others: Sequence[LayerStatistics] | None = None,
) -> Tensor:
    """``Σ_l J_l diag(w_l) J_lᵀ`` per sample, or with ``joint`` between every pair of samples.

    For a layer applied once per sample ``J_n = B_n ⊗ u_nᵀ`` gives the closed form
    ``Σ_o B_nco B_mdo Σ_a w_oa u_na u_ma`` (n = m without ``joint``), and for a scalar
    weight ``w (u_n · u_m) B_n B_mᵀ``; layers applied at several locations, and those
    without Kronecker factors, form their per-sample Jacobian, one layer at a time.

    Args:
        statistics: one entry per layer, with ``output_grads`` ``(N, C, d_out)``.
        weights: per layer ``(d_out, d_A)`` (or broadcastable, a scalar included) weights.
        joint: all pairs of samples instead of each sample with itself.
        others: the same layers' statistics of a second batch of M samples: the Gram
            between every sample of ``statistics`` and every one of ``others`` (joint).

    Returns:
        ``(N, C, C)``, or ``(N, C, N, C)`` with ``joint``, ``(N, C, M, C)`` with ``others``.
    """
    joint = joint or others is not None
    second = statistics if others is None else others
    per_sample_jacobian = "ncp,p,mdp->ncmd" if joint else "ncp,p,nep->nce"
    total = 0
    for s, t, w in zip(statistics, second, weights, strict=True):
        if not s.is_plain_linear:
            jac = s.weight_gradients().to(w.dtype)  # (N, C, d_out * d_A)
            jac_t = jac if t is s else t.weight_gradients().to(w.dtype)
            d_out = weight_shape(s.module)[0]
            flat = w.broadcast_to(d_out, jac.shape[-1] // d_out).flatten()
            total = total + torch.einsum(per_sample_jacobian, jac, flat, jac_t)
            continue
        grads, inputs = s.output_grads.to(w.dtype), s.patches()[:, 0].to(w.dtype)  # (N, C, o), (N, a)
        grads_t, inputs_t = (grads, inputs) if t is s else (t.output_grads.to(w.dtype), t.patches()[:, 0].to(w.dtype))
        if joint and w.numel() == 1:  # no (N, M, d_out) temporary
            pairs = (inputs @ inputs_t.T) * w.reshape(())
            total = total + torch.einsum("nco,mdo->ncmd", grads, grads_t) * pairs[:, None, :, None]
            continue
        w = w.broadcast_to(grads.shape[-1], inputs.shape[-1])
        if joint:
            pairs = torch.einsum("na,ma,oa->nmo", inputs, inputs_t, w)
            total = total + torch.einsum("nco,nmo,mdo->ncmd", grads, pairs, grads_t)
        else:
            spread = inputs.square() @ w.T  # (N, o)
            total = total + torch.einsum("nco,no,neo->nce", grads, spread, grads)
    return total
