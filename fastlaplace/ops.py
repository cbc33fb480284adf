"""Typed wrappers of the ``torch.ops.fastlaplace`` operators.

Every wrapper validates its arguments (errors name the argument and the layer index),
then calls the compiled operator. When the extension ``fastlaplace._C`` is missing, the
pure-PyTorch versions of :mod:`fastlaplace.reference` serve instead, with a warning;
``FASTLAPLACE_REQUIRE_EXT=1`` turns that fallback into an ImportError (CI sets it).

Fake (meta) implementations are registered here so the operators trace under
``torch.compile``; ``kron_logdet`` is differentiable in ``scale`` and ``delta``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastlaplace import reference

__all__ = [
    "batched_eigh",
    "build_info",
    "conv_input_factor_",
    "diag_ggn",
    "extension_loaded",
    "factor_accumulate_",
    "kron_logdet",
    "kron_precondition_",
    "kron_predictive_variance",
    "kron_solve",
]


def _load_extension() -> bool:
    try:
        from fastlaplace import _C  # noqa: F401  (loading registers the operators)
    except ImportError as error:
        if os.environ.get("FASTLAPLACE_REQUIRE_EXT") == "1":
            raise ImportError(
                "FASTLAPLACE_REQUIRE_EXT=1 but the compiled extension fastlaplace._C "
                f"could not be loaded ({error}); build it with "
                "`pip install --no-build-isolation -e .`"
            ) from error
        warnings.warn(
            f"fastlaplace._C is not available ({error}); using the slow pure-PyTorch reference operators",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


_EXTENSION = _load_extension()


def extension_loaded() -> bool:
    """Whether the compiled operators (not the Python reference) serve these wrappers."""
    return _EXTENSION


def build_info() -> str:
    """Devices the extension was compiled for: ``"cpu"`` or ``"cpu,cuda"``; ``"python"`` without it."""
    return torch.ops.fastlaplace.build_info() if _EXTENSION else "python"


# ----------------------------------------------------------------------------- checks


def _check_lengths(**lists: Sequence) -> int:
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per layer is needed in each list, got lengths {lengths}")
    return next(iter(lengths.values()))


def _check_tensor(t: object, name: str, dims: Sequence[int] | int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and t.dim() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_accumulator(t: Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def _check_device(tensors: Sequence[Tensor | None], names: Callable[[], Sequence[str]]) -> None:
    """The tensors present (None skipped) share one device; else a ValueError naming the odd one.

    ``names()`` labels the tensors and is called only for the error: the wrappers run at every
    step of a fit, a prior optimisation or a K-FAC preconditioner.
    """
    device = next(t.device for t in tensors if t is not None)
    if all(t is None or t.device == device for t in tensors):
        return
    present = [(t, n) for t, n in zip(tensors, names(), strict=True) if t is not None]
    for t, name in present:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {present[0][1]} is on {device}")


def _check_square(t: Tensor, size: int, name: str) -> None:
    if t.shape != (size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}), got {tuple(t.shape)}")


def _check_square_matrices(matrices: Sequence[Tensor]) -> None:
    """Each ``matrices[i]`` a square float32/float64 tensor."""
    for i, m in enumerate(matrices):
        _check_tensor(m, f"matrices[{i}]", 2)
        _check_accumulator(m, f"matrices[{i}]")
        _check_square(m, m.shape[0], f"matrices[{i}]")


def _check_per_layer(t: object, count: int, name: str, nonnegative: bool) -> Tensor:
    _check_tensor(t, name, 1)
    if t.shape[0] != count:
        raise ValueError(f"{name} must have one entry per layer ({count}), got shape {tuple(t.shape)}")
    # One reduction, and NaN fails it too (NaN >= 0 is false).
    if nonnegative and not torch.compiler.is_compiling() and not bool((t >= 0).all()):
        raise ValueError(f"{name} must be non-negative, got {t.tolist()}")
    return t


def _check_eigenpairs(
    eigvecs_a: Sequence[Tensor],
    eigvals_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    eigvals_g: Sequence[Tensor],
    scale: Tensor,
    delta: Tensor,
) -> int:
    count = _check_lengths(eigvecs_a=eigvecs_a, eigvals_a=eigvals_a, eigvecs_g=eigvecs_g, eigvals_g=eigvals_g)
    for i in range(count):
        for side, vecs, vals in (("a", eigvecs_a, eigvals_a), ("g", eigvecs_g, eigvals_g)):
            q = _check_tensor(vecs[i], f"eigvecs_{side}[{i}]", 2)
            lam = _check_tensor(vals[i], f"eigvals_{side}[{i}]", 1)
            _check_accumulator(q, f"eigvecs_{side}[{i}]")
            _check_square(q, lam.shape[0], f"eigvecs_{side}[{i}]")
            if lam.dtype != q.dtype:
                raise TypeError(f"eigvals_{side}[{i}] is {lam.dtype} but eigvecs_{side}[{i}] is {q.dtype}")
        if eigvecs_g[i].dtype != eigvecs_a[i].dtype:
            raise TypeError(f"eigvecs_g[{i}] is {eigvecs_g[i].dtype} but eigvecs_a[{i}] is {eigvecs_a[i].dtype}")
    _check_per_layer(scale, count, "scale", nonnegative=True)
    _check_per_layer(delta, count, "delta", nonnegative=True)
    return count


# ----------------------------------------------------------------------------- operators


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
    count = _check_lengths(factors=factors, inputs=inputs, append_ones=append_ones)
    if count == 0:
        return
    for i in range(count):
        f = _check_tensor(factors[i], f"factors[{i}]", 2)
        x = _check_tensor(inputs[i], f"inputs[{i}]", 2)
        _check_accumulator(f, f"factors[{i}]")
        if not f.is_contiguous():
            raise ValueError(f"factors[{i}] must be contiguous (it is written in place)")
        _check_square(f, x.shape[1] + bool(append_ones[i]), f"factors[{i}]")
        _check_device([f, x], lambda i=i: [f"factors[{i}]", f"inputs[{i}]"])
    _check_device(list(factors), lambda: [f"factors[{i}]" for i in range(count)])
    impl = torch.ops.fastlaplace.factor_accumulate_ if _EXTENSION else reference.factor_accumulate_
    impl(list(factors), list(inputs), [bool(b) for b in append_ones], float(alpha), float(beta))


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or two ints, got {value!r}")
    return pair


def conv_input_factor_(
    factor: Tensor,
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    append_ones: bool = False,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> None:
    """In place: ``F <- beta F + alpha Σ_{n,p} u_{n,p} u_{n,p}ᵀ`` over Conv2d patches.

    The patches (implicit im2col) are unfolded a few images at a time, never for the
    whole batch. As in :func:`factor_accumulate_`, only the upper triangle of the
    (symmetric) factor is read.

    Args:
        factor: contiguous float32/float64 ``(C*kh*kw + append_ones,)*2``.
        input: ``(N, C, H, W)`` images.
        kernel_size: kernel height and width (an int for both), as for ``torch.nn.Conv2d``.
        stride: as for ``torch.nn.Conv2d``.
        padding: zero padding, as for ``torch.nn.Conv2d`` (groups=1 only).
        dilation: as for ``torch.nn.Conv2d``.
        append_ones: whether the convolution has a bias.
        alpha: scale of the new patch Gram matrix.
        beta: decay of the old factor; 0 ignores its old content.
    """
    _check_tensor(factor, "factor", 2)
    _check_tensor(input, "input", 4)
    _check_accumulator(factor, "factor")
    if not factor.is_contiguous():
        raise ValueError("factor must be contiguous (it is written in place)")
    _check_device([factor, input], lambda: ["factor", "input"])
    kernel, strides, pads, dils = (
        _pair(kernel_size, "kernel_size"),
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(kernel + strides + dils) < 1 or min(pads) < 0:
        raise ValueError(
            f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got "
            f"kernel_size={kernel}, stride={strides}, padding={pads}, dilation={dils}"
        )
    for axis in range(2):
        span = dils[axis] * (kernel[axis] - 1) + 1
        if input.shape[2 + axis] + 2 * pads[axis] < span:
            raise ValueError(
                f"input of spatial size {tuple(input.shape[2:])} is smaller than the "
                f"kernel's span {span} along dimension {2 + axis} (padding {pads[axis]})"
            )
    _check_square(factor, input.shape[1] * kernel[0] * kernel[1] + bool(append_ones), "factor")
    impl = torch.ops.fastlaplace.conv_input_factor_ if _EXTENSION else reference.conv_input_factor_
    impl(factor, input, kernel, strides, pads, dils, bool(append_ones), float(alpha), float(beta))


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
    count = _check_lengths(inputs=inputs, output_grads=output_grads, append_ones=append_ones)
    if count == 0:
        return []
    for i in range(count):
        a = _check_tensor(inputs[i], f"inputs[{i}]", 2)
        g = _check_tensor(output_grads[i], f"output_grads[{i}]", (2, 3))
        if g.shape[0] != a.shape[0]:
            raise ValueError(f"output_grads[{i}] has {g.shape[0]} samples but inputs[{i}] has {a.shape[0]}")
        _check_device([a, g], lambda i=i: [f"inputs[{i}]", f"output_grads[{i}]"])
    _check_device(list(inputs), lambda: [f"inputs[{i}]" for i in range(count)])
    impl = torch.ops.fastlaplace.diag_ggn if _EXTENSION else reference.diag_ggn
    return impl(list(inputs), list(output_grads), [bool(b) for b in append_ones])


def batched_eigh(matrices: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Eigenpairs of symmetric matrices of mixed sizes in one call.

    On the CPU, LAPACK per matrix, small ones side by side on the threads. On CUDA, the
    matrices of at most 112 rows that fit one block's shared memory are diagonalised in one
    launch per dtype, one block per matrix (a Jacobi solver working in double); larger
    ones go to cuSOLVER one by one.

    Args:
        matrices: L float32/float64 tensors ``(d_i, d_i)``; lower triangles are read.

    Returns:
        ``(eigenvalues, eigenvectors)``: L tensors ``(d_i,)`` ascending and L tensors
        ``(d_i, d_i)`` with eigenvectors as columns.

    Raises:
        RuntimeError: if an eigendecomposition fails to converge (NaN/Inf input).
    """
    if len(matrices) == 0:
        return [], []
    _check_square_matrices(matrices)
    _check_device(list(matrices), lambda: [f"matrices[{i}]" for i in range(len(matrices))])
    impl = torch.ops.fastlaplace.batched_eigh if _EXTENSION else reference.batched_eigh
    values, vectors = impl(list(matrices))
    return list(values), list(vectors)


def kron_solve(
    eigvecs_a: Sequence[Tensor],
    eigvals_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    eigvals_g: Sequence[Tensor],
    rhs: Sequence[Tensor],
    scale: Tensor,
    delta: Tensor,
    exponent: float = -1.0,
) -> list[Tensor]:
    """``P_i^exponent V_i`` per layer with ``P_i = s_i kron(G_i, A_i) + δ_i I``, exactly.

    ``P^p V = Q_G [(Q_Gᵀ V Q_A) ⊘ (s μ_j λ_i + δ)^-p] Q_Aᵀ`` with clamped eigenvalues.

    Args:
        eigvecs_a: L eigenvector matrices ``(d_A, d_A)`` of the input factors A_i.
        eigvals_a: L eigenvalue vectors ``(d_A,)`` of A_i.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)`` of the output factors G_i.
        eigvals_g: L eigenvalue vectors ``(d_G,)`` of G_i.
        rhs: L tensors ``(*, d_G, d_A)`` (leading dimensions are a batch).
        scale: ``(L,)`` non-negative factor scales s_i.
        delta: ``(L,)`` non-negative prior precisions δ_i.
        exponent: power of P (-1 solves, -0.5 for sampling).

    Returns:
        L tensors shaped like ``rhs`` in the eigenvectors' dtype.
    """
    count = _check_eigenpairs(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, scale, delta)
    _check_lengths(eigvecs_a=eigvecs_a, rhs=rhs)
    if count == 0:
        return []
    for i, v in enumerate(rhs):
        _check_tensor(v, f"rhs[{i}]")
        expected = (eigvals_g[i].shape[0], eigvals_a[i].shape[0])
        if v.dim() < 2 or tuple(v.shape[-2:]) != expected:
            raise ValueError(f"rhs[{i}] must have shape (*, {expected[0]}, {expected[1]}), got {tuple(v.shape)}")
    _check_device(
        [*eigvecs_a, *eigvals_a, *eigvecs_g, *eigvals_g, *rhs, scale, delta],
        lambda: (
            [f"{n}[{i}]" for n in ("eigvecs_a", "eigvals_a", "eigvecs_g", "eigvals_g", "rhs") for i in range(count)]
            + ["scale", "delta"]
        ),
    )
    impl = torch.ops.fastlaplace.kron_solve if _EXTENSION else reference.kron_solve
    return impl(
        list(eigvecs_a), list(eigvals_a), list(eigvecs_g), list(eigvals_g), list(rhs), scale, delta, float(exponent)
    )


def _check_preconditioned_layers(
    gradients: Sequence[Tensor],
    blocks: Sequence[int],
    mats_a: Sequence[Tensor],
    mats_g: Sequence[Tensor],
    names: tuple[str, str],
    kl_weights: Tensor | None,
) -> None:
    """The checks :func:`kron_precondition_` and :func:`kron_inverse_precondition_` share.

    Per layer a square float32/float64 ``(d_A, d_A)`` matrix of ``mats_a`` and
    ``(d_G, d_G)`` of ``mats_g``, all of one dtype; its next ``blocks[i]`` gradients have
    d_G rows and d_A columns in all.
    """
    name_a, name_g = names
    count = _check_lengths(**{name_a: mats_a, name_g: mats_g, "blocks": blocks})
    if count == 0:
        raise ValueError("at least one layer is needed")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(f"blocks must be positive integers, got {list(blocks)}")
    if sum(blocks) != len(gradients):
        raise ValueError(f"blocks announce {sum(blocks)} gradient blocks, got {len(gradients)}")
    dtype, first = mats_a[0].dtype, 0
    for i in range(count):
        a, g = mats_a[i], mats_g[i]
        d_a, d_g = a.shape[0], g.shape[0]
        _check_accumulator(a, f"{name_a}[{i}]")
        _check_square(a, d_a, f"{name_a}[{i}]")
        _check_square(g, d_g, f"{name_g}[{i}]")
        if g.dtype != dtype or a.dtype != dtype:
            raise TypeError(f"layer {i}: {name_a} and {name_g} must all be {dtype}")
        width = 0
        for j in range(first, first + blocks[i]):
            block = _check_tensor(gradients[j], f"gradients[{j}]")
            if block.dim() == 0 or block.shape[0] != d_g:
                raise ValueError(
                    f"gradients[{j}] must have {d_g} rows (layer {i}'s d_G), got shape {tuple(block.shape)}"
                )
            width += block.numel() // d_g
        if width != d_a:
            raise ValueError(f"layer {i}: its gradient blocks have {width} columns, its {name_a} {d_a}")
        first += blocks[i]
    if kl_weights is not None:
        _check_per_layer(kl_weights, count, "kl_weights", nonnegative=False)
    lists = (("gradients", len(gradients)), (name_a, count), (name_g, count))
    _check_device(
        [*gradients, *mats_a, *mats_g, kl_weights],
        lambda: [f"{name}[{i}]" for name, k in lists for i in range(k)] + ["kl_weights"],
    )


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
    impl = torch.ops.fastlaplace.kron_precondition_ if _EXTENSION else reference.kron_precondition_
    if not validate:
        return impl(gradients, blocks, eigvecs_a, eigvecs_g, inverse_spectra, kl_weights)
    _check_preconditioned_layers(gradients, blocks, eigvecs_a, eigvecs_g, ("eigvecs_a", "eigvecs_g"), kl_weights)
    if len(inverse_spectra) != len(eigvecs_a):
        raise ValueError(f"inverse_spectra needs one entry per layer ({len(eigvecs_a)}), got {len(inverse_spectra)}")
    for i, (qa, qg, inverse) in enumerate(zip(eigvecs_a, eigvecs_g, inverse_spectra, strict=True)):
        _check_tensor(inverse, f"inverse_spectra[{i}]")
        if inverse.dtype != qa.dtype:
            raise TypeError(f"layer {i}: eigenvectors and inverse spectra must all be {qa.dtype}")
        if inverse.shape != (qg.shape[0], qa.shape[0]):
            raise ValueError(
                f"inverse_spectra[{i}] must have shape ({qg.shape[0]}, {qa.shape[0]}), got {tuple(inverse.shape)}"
            )
    _check_device(
        [eigvecs_a[0], *inverse_spectra],
        lambda: ["eigvecs_a[0]"] + [f"inverse_spectra[{i}]" for i in range(len(inverse_spectra))],
    )
    return impl(list(gradients), list(blocks), list(eigvecs_a), list(eigvecs_g), list(inverse_spectra), kl_weights)


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
    impl = torch.ops.fastlaplace.kron_inverse_precondition_ if _EXTENSION else reference.kron_inverse_precondition_
    if validate:
        _check_preconditioned_layers(
            gradients, blocks, inverses_a, inverses_g, ("inverses_a", "inverses_g"), kl_weights
        )
    return impl(list(gradients), list(blocks), list(inverses_a), list(inverses_g), kl_weights)


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
    _check_square_matrices(matrices)
    _check_per_layer(shifts, count, "shifts", nonnegative=False)
    if not bool((shifts > 0).all()):
        raise ValueError(f"shifts must be positive, got {shifts.tolist()}")
    _check_device([*matrices, shifts], lambda: [f"matrices[{i}]" for i in range(count)] + ["shifts"])
    if _EXTENSION:  # the compiled kernel checks for NaN and Inf itself, in one pass per matrix
        return list(torch.ops.fastlaplace.damped_inverses(list(matrices), shifts))
    for i, m in enumerate(matrices):
        if not bool(torch.isfinite(m).all()):
            raise RuntimeError(f"matrices[{i}] contains NaN or Inf; its inverse is undefined")
    return reference.damped_inverses(list(matrices), shifts)


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
    count = _check_lengths(eigvals_a=eigvals_a, eigvals_g=eigvals_g)
    for i in range(count):
        for side, vals in (("a", eigvals_a), ("g", eigvals_g)):
            _check_tensor(vals[i], f"eigvals_{side}[{i}]", 1)
            _check_accumulator(vals[i], f"eigvals_{side}[{i}]")
        if eigvals_a[i].dtype != eigvals_g[i].dtype:
            raise TypeError(f"eigvals_a[{i}] is {eigvals_a[i].dtype} but eigvals_g[{i}] is {eigvals_g[i].dtype}")
    _check_per_layer(scale, count, "scale", nonnegative=True)
    _check_per_layer(delta, count, "delta", nonnegative=True)
    _check_device(
        [*eigvals_a, *eigvals_g, scale, delta],
        lambda: [f"eigvals_{s}[{i}]" for s in "ag" for i in range(count)] + ["scale", "delta"],
    )
    impl = torch.ops.fastlaplace.kron_logdet if _EXTENSION else reference.kron_logdet
    return impl(list(eigvals_a), list(eigvals_g), scale, delta)


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
    count = _check_eigenpairs(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, scale, delta)
    _check_lengths(eigvecs_a=eigvecs_a, inputs=inputs, output_jacobians=output_jacobians, append_ones=append_ones)
    if count == 0:
        raise ValueError("kron_predictive_variance needs at least one layer")
    samples, outputs = None, None
    for i in range(count):
        a = _check_tensor(inputs[i], f"inputs[{i}]", 2)
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
            _check_tensor(jac, f"output_jacobians[{i}]", 3)
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
    _check_device(
        [*inputs, *output_jacobians, *eigvecs_a, scale, delta],
        lambda: (
            [f"{n}[{i}]" for n in ("inputs", "output_jacobians", "eigvecs_a") for i in range(count)]
            + ["scale", "delta"]
        ),
    )
    impl = torch.ops.fastlaplace.kron_predictive_variance if _EXTENSION else reference.kron_predictive_variance
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


# ----------------------------------------------------------------------------- fake kernels and autograd

if _EXTENSION:

    @torch.library.register_fake("fastlaplace::factor_accumulate_")
    def _factor_accumulate_fake(factors, inputs, append_ones, alpha=1.0, beta=1.0):
        return None

    @torch.library.register_fake("fastlaplace::conv_input_factor_")
    def _conv_input_factor_fake(
        factor, input, kernel_size, stride, padding, dilation, append_ones, alpha=1.0, beta=1.0
    ):
        return None

    @torch.library.register_fake("fastlaplace::diag_ggn")
    def _diag_ggn_fake(inputs, output_grads, append_ones):
        return [
            a.new_empty((g.shape[-1], a.shape[1] + int(ones)), dtype=reference.accumulation_dtype(a.dtype))
            for a, g, ones in zip(inputs, output_grads, append_ones, strict=True)
        ]

    @torch.library.register_fake("fastlaplace::batched_eigh")
    def _batched_eigh_fake(matrices):
        # LAPACK and cuSOLVER return the eigenvectors column-major.
        return [m.new_empty(m.shape[:1]) for m in matrices], [m.new_empty(m.shape).mT for m in matrices]

    @torch.library.register_fake("fastlaplace::kron_solve")
    def _kron_solve_fake(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta, exponent=-1.0):
        return [v.new_empty(v.shape, dtype=qa.dtype) for v, qa in zip(rhs, eigvecs_a, strict=True)]

    @torch.library.register_fake("fastlaplace::kron_precondition_")
    def _kron_precondition_fake(gradients, blocks, eigvecs_a, eigvecs_g, inverse_spectra, kl_weights=None):
        return eigvecs_a[0].new_empty(())

    @torch.library.register_fake("fastlaplace::kron_inverse_precondition_")
    def _kron_inverse_precondition_fake(gradients, blocks, inverses_a, inverses_g, kl_weights=None):
        return inverses_a[0].new_empty(())

    @torch.library.register_fake("fastlaplace::damped_inverses")
    def _damped_inverses_fake(matrices, shifts):
        return [m.new_empty(m.shape) for m in matrices]

    @torch.library.register_fake("fastlaplace::kron_logdet")
    def _kron_logdet_fake(eigvals_a, eigvals_g, scale, delta):
        return scale.new_empty((len(eigvals_a),), dtype=eigvals_a[0].dtype)

    @torch.library.register_fake("fastlaplace::kron_predictive_variance")
    def _kron_predictive_variance_fake(
        inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, scale, delta, append_ones, full_covariance
    ):
        jac = output_jacobians[0]
        outputs = eigvals_g[0].shape[0] if jac is None else jac.shape[1]
        shape = (inputs[0].shape[0], outputs, outputs) if full_covariance else (inputs[0].shape[0], outputs)
        return inputs[0].new_empty(shape, dtype=eigvecs_a[0].dtype)

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
