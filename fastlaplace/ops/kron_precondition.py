"""``torch.ops.fastlaplace.kron_precondition_``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_device, check_preconditioned_layers, check_tensor
from fastlaplace.ops._extension import EXTENSION


def kron_precondition_(
    gradients: Sequence[Tensor],
    blocks: Sequence[int],
    eigvecs_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    inverse_spectra: Sequence[Tensor],
    kl_weights: Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """K-FAC's preconditioning, in place: ``V_i ← ν Q_G [(Q_Gᵀ V_i Q_A) ⊙ S_i] Q_Aᵀ`` per layer.

    With ``S_i = 1 / (μ λᵀ + δ)`` this is ``ν (G ⊗ A + δ)⁻¹ vec V_i`` (row-major vec). Layer
    i's ``V_i`` is ``[g_1 | g_2 | ...]``, its next ``blocks[i]`` gradients each viewed as
    ``(d_G, width)`` (a weight ``(d_G, ...)``, then its bias ``(d_G,)``); the result is
    written back into them. With ``kl_weights`` k (``lr_i² / kl_clip``),
    ``ν = min(1, 1 / √(Σ_i k_i ⟨V_i, (F_i + δ)⁻¹ V_i⟩))`` (K-FAC's KL clipping), else ν = 1.

    Args:
        gradients: the blocks, any floating dtype, each ``(d_G of its layer, ...)``; overwritten.
        blocks: L positive counts of consecutive blocks per layer.
        eigvecs_a: L float32/float64 eigenvector matrices ``(d_A, d_A)``, d_A the blocks' total width.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)`` of the same dtype.
        inverse_spectra: L ``(d_G, d_A)`` matrices S_i of the same dtype.
        kl_weights: ``(L,)`` weights (``lr_i² / kl_clip``), or None for ν = 1.
        validate: check the arguments here first. A caller that builds them itself at every
            training step (the K-FAC preconditioner) skips these Python checks; the compiled
            kernel still checks shapes and dtypes.

    Returns:
        ν, a 0-d tensor in the eigenvectors' dtype (no host synchronisation on a GPU).
    """
    impl = torch.ops.fastlaplace.kron_precondition_ if EXTENSION else reference.kron_precondition_
    if not validate:
        return impl(gradients, blocks, eigvecs_a, eigvecs_g, inverse_spectra, kl_weights)
    check_preconditioned_layers(gradients, blocks, eigvecs_a, eigvecs_g, ("eigvecs_a", "eigvecs_g"), kl_weights)
    if len(inverse_spectra) != len(eigvecs_a):
        raise ValueError(f"inverse_spectra needs one entry per layer ({len(eigvecs_a)}), got {len(inverse_spectra)}")
    for i, (qa, qg, inverse) in enumerate(zip(eigvecs_a, eigvecs_g, inverse_spectra, strict=True)):
        check_tensor(inverse, f"inverse_spectra[{i}]")
        if inverse.dtype != qa.dtype:
            raise TypeError(f"layer {i}: eigenvectors and inverse spectra must all be {qa.dtype}")
        if inverse.shape != (qg.shape[0], qa.shape[0]):
            raise ValueError(
                f"inverse_spectra[{i}] must have shape ({qg.shape[0]}, {qa.shape[0]}), got {tuple(inverse.shape)}"
            )
    check_device(
        [eigvecs_a[0], *inverse_spectra],
        lambda: ["eigvecs_a[0]"] + [f"inverse_spectra[{i}]" for i in range(len(inverse_spectra))],
    )
    return impl(list(gradients), list(blocks), list(eigvecs_a), list(eigvecs_g), list(inverse_spectra), kl_weights)


if EXTENSION:

    @torch.library.register_fake("fastlaplace::kron_precondition_")
    def _kron_precondition_fake(gradients, blocks, eigvecs_a, eigvecs_g, inverse_spectra, kl_weights=None):
        return eigvecs_a[0].new_empty(())
