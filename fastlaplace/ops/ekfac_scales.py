"""``torch.ops.fastlaplace.ekfac_scales_``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_accumulator, check_device, check_lengths, check_square, check_tensor
from fastlaplace.ops._extension import EXTENSION


def ekfac_scales_(
    scales: Sequence[Tensor],
    inputs: Sequence[Tensor],
    output_grads: Sequence[Tensor],
    eigvecs_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    weight: float = 1.0,
    decay: float = 1.0,
) -> None:
    """In place, for every layer: ``S <- decay S + weight Σ_{n,k} (Q_Gᵀ G_nkᵀ A_n Q_A)²`` (entrywise square).

    ``G_nkᵀ A_n`` is datum n's gradient (column k) w.r.t. the layer's ``(d_G, d_A)`` weight
    matrix, so S holds the second moments of the gradients' coordinates in the Kronecker
    eigenbasis ``Q_A ⊗ Q_G``: the corrected eigenvalues of EKFAC (George et al. 2018).
    With one location per datum (T = 1) the sum is one GEMM of squared rotations; with
    T > 1 the data are taken in chunks of at most 2²⁴ rotated gradient entries.

    Args:
        scales: L float32/float64 tensors ``(d_G, d_A)``; with ``decay == 0`` their old
            content is ignored (NaN included).
        inputs: L tensors ``(N, T, d_A)`` (``(N, d_A)``: T = 1), each datum's inputs at its
            T locations (patches, tokens) with any ones column of a bias; any floating dtype,
            converted to the scales' dtype.
        output_grads: L tensors ``(N, K, T, d_G)`` (``(N, T, d_G)``: K = 1; ``(N, d_G)``:
            K = T = 1): K gradient columns per datum w.r.t. the layer's outputs.
        eigvecs_a: L ``(d_A, d_A)`` eigenvectors Q_A (columns), in the scales' dtype.
        eigvecs_g: L ``(d_G, d_G)`` eigenvectors Q_G, in the scales' dtype.
        weight: scale of the new sums.
        decay: decay of the old scales.

    Raises:
        TypeError: on integer tensors, or scales / eigenvectors that are not float32/float64
            or not of one dtype per layer.
        ValueError: on lists of different lengths, shapes that do not match (named), or
            tensors on different devices.
    """
    count = check_lengths(
        scales=scales, inputs=inputs, output_grads=output_grads, eigvecs_a=eigvecs_a, eigvecs_g=eigvecs_g
    )
    if count == 0:
        return
    for i in range(count):
        s = check_tensor(scales[i], f"scales[{i}]", 2)
        a = check_tensor(inputs[i], f"inputs[{i}]", (2, 3))
        g = check_tensor(output_grads[i], f"output_grads[{i}]", (2, 3, 4))
        check_accumulator(s, f"scales[{i}]")
        n, locations = a.shape[0], 1 if a.dim() == 2 else a.shape[1]
        g_locations = 1 if g.dim() == 2 else g.shape[-2]
        if g.shape[0] != n or g_locations != locations:
            raise ValueError(
                f"output_grads[{i}] {tuple(g.shape)} must have the N and T of inputs[{i}] {tuple(a.shape)}"
            )
        d_a, d_g = a.shape[-1], g.shape[-1]
        check_square(check_tensor(eigvecs_a[i], f"eigvecs_a[{i}]", 2), d_a, f"eigvecs_a[{i}]")
        check_square(check_tensor(eigvecs_g[i], f"eigvecs_g[{i}]", 2), d_g, f"eigvecs_g[{i}]")
        if s.shape != (d_g, d_a):
            raise ValueError(f"scales[{i}] must have shape ({d_g}, {d_a}), got {tuple(s.shape)}")
        if eigvecs_a[i].dtype != s.dtype or eigvecs_g[i].dtype != s.dtype:
            raise TypeError(
                f"layer {i}: eigvecs_a, eigvecs_g and scales must share a dtype, got "
                f"{eigvecs_a[i].dtype}, {eigvecs_g[i].dtype} and {s.dtype}"
            )
    lists = (("scales", scales), ("inputs", inputs), ("output_grads", output_grads))
    lists += (("eigvecs_a", eigvecs_a), ("eigvecs_g", eigvecs_g))
    check_device(
        [t for _, values in lists for t in values],
        lambda: [f"{name}[{i}]" for name, values in lists for i in range(len(values))],
    )
    impl = torch.ops.fastlaplace.ekfac_scales_ if EXTENSION else reference.ekfac_scales_
    impl(list(scales), list(inputs), list(output_grads), list(eigvecs_a), list(eigvecs_g), float(weight), float(decay))


if EXTENSION:

    @torch.library.register_fake("fastlaplace::ekfac_scales_")
    def _ekfac_scales_fake(scales, inputs, output_grads, eigvecs_a, eigvecs_g, weight=1.0, decay=1.0):
        return None
