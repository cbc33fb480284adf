"""``torch.ops.fastlaplace.kron_inverse_precondition_``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_preconditioned_layers
from fastlaplace.ops._extension import EXTENSION


def kron_inverse_precondition_(
    gradients: Sequence[Tensor],
    blocks: Sequence[int],
    inverses_a: Sequence[Tensor],
    inverses_g: Sequence[Tensor],
    kl_weights: Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """K-FAC's preconditioning with factored damping, in place: ``V_i ← ν G_i⁻¹ V_i A_i⁻¹`` per layer.

    With ``A_i⁻¹ = (A + π√δ I)⁻¹`` and ``G_i⁻¹ = (G + √δ/π I)⁻¹`` (from :func:`damped_inverses`)
    this is ``ν (Ḡ ⊗ Ā)⁻¹ vec V_i``, two GEMMs per layer. Blocks, ``kl_weights``, ν and
    ``validate`` as in :func:`kron_precondition_`, with ``⟨V_i, G_i⁻¹ V_i A_i⁻¹⟩`` in ν.

    Args:
        gradients: the blocks, any floating dtype, each ``(d_G of its layer, ...)``; overwritten.
        blocks: L positive counts of consecutive blocks per layer.
        inverses_a: L float32/float64 symmetric matrices ``(d_A, d_A)``.
        inverses_g: L symmetric matrices ``(d_G, d_G)`` of the same dtype.
        kl_weights: ``(L,)`` weights (``lr_i² / kl_clip``), or None for ν = 1.
        validate: check the arguments here first (see :func:`kron_precondition_`).

    Returns:
        ν, a 0-d tensor in the inverses' dtype (no host synchronisation on a GPU).
    """
    impl = torch.ops.fastlaplace.kron_inverse_precondition_ if EXTENSION else reference.kron_inverse_precondition_
    if validate:
        check_preconditioned_layers(gradients, blocks, inverses_a, inverses_g, ("inverses_a", "inverses_g"), kl_weights)
    return impl(list(gradients), list(blocks), list(inverses_a), list(inverses_g), kl_weights)


if EXTENSION:

    @torch.library.register_fake("fastlaplace::kron_inverse_precondition_")
    def _kron_inverse_precondition_fake(gradients, blocks, inverses_a, inverses_g, kl_weights=None):
        return inverses_a[0].new_empty(())
