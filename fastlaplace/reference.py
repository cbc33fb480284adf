"""Pure-PyTorch versions of every fastlaplace operator: the test oracle.

Each function here has the same arguments and the same result as the operator of the
same name in :mod:`fastlaplace.ops`, written as plainly as possible. They are slow and
allocate freely; they exist to be obviously right.

Conventions (docs/design.md):

* A Linear-like layer has an input ``a`` of width ``d_in`` and an output of width
  ``d_out``. With ``append_ones`` the input gets a constant 1 appended, so the
  Kronecker factor ``A`` is ``(d_in + 1) x (d_in + 1)``.
* The weight matrix ``[W | b]`` of shape ``(d_out, d_A)`` is vectorised row-major.
  In that order the curvature ``H = A ⊗ G`` of docs/design.md is the dense matrix
  ``torch.kron(G, A)`` and a vector is a ``(d_G, d_A)`` matrix ``V``.
* Posterior precision of one layer: ``P = s * kron(G, A) + delta * I`` with a scale
  ``s`` (data normalisation / temperature) and a prior precision ``delta`` per layer.
  Eigenvalues of the factors are clamped at 0 before use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which curvature of inputs of ``dtype`` is accumulated: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _with_ones(x: Tensor, append_ones: bool) -> Tensor:
    if not append_ones:
        return x
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


def factor_accumulate_(
    factors: list[Tensor],
    inputs: list[Tensor],
    append_ones: list[bool],
    alpha: float = 1.0,
    beta: float = 1.0,
) -> None:
    """In place, for every layer i: ``F_i <- beta F_i + alpha X_iᵀ X_i``.

    Args:
        factors: L symmetric tensors ``(d_i + append_ones[i], d_i + append_ones[i])``,
            float32 or float64, contiguous; updated in place. With ``beta == 0`` their old content
            is ignored (NaN included), as in BLAS.
        inputs: L tensors ``(N_i, d_i)`` of any floating dtype; converted to the
            factor's dtype before the product.
        append_ones: whether layer i's input gets a constant 1 column (bias).
        alpha: scale of the new Gram matrix.
        beta: decay of the old factor (``beta < 1``: exponential moving average).
    """
    for factor, x, ones in zip(factors, inputs, append_ones, strict=True):
        xf = _with_ones(x.to(factor.dtype), ones)
        gram = xf.T @ xf
        if beta == 0:
            factor.copy_(alpha * gram)
        else:
            factor.mul_(beta).add_(gram, alpha=alpha)


def conv_input_factor_(
    factor: Tensor,
    input: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    append_ones: bool,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> None:
    """In place: ``F <- beta F + alpha Σ_{n,p} u_{n,p} u_{n,p}ᵀ`` for a Conv2d input.

    ``u_{n,p}`` is the patch of image n that output position p sees (length
    ``C*kh*kw``, in the order of ``weight.flatten(1)``), with a 1 appended when
    ``append_ones``.

    Args:
        factor: ``(C*kh*kw + append_ones,)*2`` float32/float64, updated in place.
        input: ``(N, C, H, W)`` images, any floating dtype.
        kernel_size: 2 ints, as for ``torch.nn.Conv2d``.
        stride: 2 ints, as for ``torch.nn.Conv2d``.
        padding: 2 ints of zero padding (groups = 1).
        dilation: 2 ints, as for ``torch.nn.Conv2d``.
        append_ones: bias of the convolution.
        alpha: scale of the new patch Gram matrix.
        beta: decay of the old factor.
    """
    patches = torch.nn.functional.unfold(
        input.to(factor.dtype), kernel_size, dilation=dilation, padding=padding, stride=stride
    )  # (N, C*kh*kw, L)
    rows = _with_ones(patches.transpose(1, 2).reshape(-1, patches.shape[1]), append_ones)
    factor_accumulate_([factor], [rows], [False], alpha, beta)


def diag_ggn(inputs: list[Tensor], output_grads: list[Tensor], append_ones: list[bool]) -> list[Tensor]:
    """Diagonal of the GGN of Linear-like layers from inputs and output gradients.

    ``diag_i = Σ_n Σ_k (g_{n,k} ∘ g_{n,k}) (a_n ∘ a_n)ᵀ``: exact for layers applied once
    per sample, where the per-sample gradient is the outer product ``g aᵀ``.

    Args:
        inputs: L tensors ``(N, d_in)``.
        output_grads: L tensors ``(N, K, d_out)`` (K loss-Hessian square-root columns
            or sampled gradients) or ``(N, d_out)`` (K = 1).
        append_ones: bias per layer (its diagonal is the last column).

    Returns:
        L tensors ``(d_out, d_in + append_ones)`` in the accumulation dtype.
    """
    result = []
    for a, g, ones in zip(inputs, output_grads, append_ones, strict=True):
        dtype = accumulation_dtype(a.dtype)
        af = _with_ones(a.to(dtype), ones)
        gf = g.to(dtype)
        g_squared = gf.square() if gf.dim() == 2 else gf.square().sum(dim=1)
        result.append(g_squared.T @ af.square())
    return result


def batched_eigh(matrices: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Eigenpairs of symmetric matrices of mixed sizes (lower triangles are read).

    Args:
        matrices: L tensors ``(d_i, d_i)``, float32 or float64.

    Returns:
        (eigenvalues, eigenvectors): L tensors ``(d_i,)`` ascending and L tensors
        ``(d_i, d_i)`` whose columns are the eigenvectors.
    """
    pairs = [torch.linalg.eigh(m) for m in matrices]
    return [p.eigenvalues for p in pairs], [p.eigenvectors for p in pairs]


def damped_eigenvalues(eigvals_a: Tensor, eigvals_g: Tensor, scale: Tensor, delta: Tensor) -> Tensor:
    """``(d_G, d_A)`` matrix of ``s μ_j λ_i + δ`` with both spectra clamped at 0."""
    return scale * torch.outer(eigvals_g.clamp_min(0), eigvals_a.clamp_min(0)) + delta


def kron_solve(
    eigvecs_a: list[Tensor],
    eigvals_a: list[Tensor],
    eigvecs_g: list[Tensor],
    eigvals_g: list[Tensor],
    rhs: list[Tensor],
    scale: Tensor,
    delta: Tensor,
    exponent: float = -1.0,
) -> list[Tensor]:
    """``P_i^exponent V_i`` for every layer, P_i = s_i kron(G_i, A_i) + δ_i I.

    ``exponent = -1`` solves, ``-0.5`` applies the inverse square root (sampling).

    Args:
        eigvecs_a: L eigenvector matrices ``(d_A, d_A)`` of the input factors A_i.
        eigvals_a: L eigenvalue vectors ``(d_A,)`` of A_i.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)`` of the output factors G_i.
        eigvals_g: L eigenvalue vectors ``(d_G,)`` of G_i.
        rhs: L tensors ``(*, d_G, d_A)``; leading dimensions are a batch.
        scale: ``(L,)`` factor scale s_i.
        delta: ``(L,)`` prior precision δ_i.
        exponent: power of P.

    Returns:
        L tensors shaped like ``rhs``.
    """
    out = []
    for i, v in enumerate(rhs):
        qa, qg = eigvecs_a[i], eigvecs_g[i]
        d = damped_eigenvalues(eigvals_a[i], eigvals_g[i], scale[i], delta[i])
        rotated = qg.T @ v.to(qa.dtype) @ qa
        out.append(qg @ (rotated * d.pow(exponent)) @ qa.T)
    return out


def _precondition_layers_(
    gradients: list[Tensor],
    blocks: list[int],
    solves: list[Callable[[Tensor], Tensor]],
    dtype: torch.dtype,
    kl_weights: Tensor | None,
) -> Tensor:
    """In place, per layer: ``V_i ← ν solves[i](V_i)``, V_i the layer's blocks side by side; returns ν."""
    updates, dots, first = [], [], 0
    for solve, count in zip(solves, blocks, strict=True):
        layer = gradients[first : first + count]
        v = torch.cat([g.reshape(g.shape[0], -1).to(dtype) for g in layer], dim=1)
        updates.append(solve(v))
        dots.append((v * updates[-1]).sum())
        first += count
    scale = torch.ones((), dtype=dtype, device=updates[0].device)
    if kl_weights is not None:
        scale = (torch.stack(dots) @ kl_weights.to(scale.dtype)).clamp_min(0).rsqrt().clamp_max(1)
    first = 0
    for update, count in zip(updates, blocks, strict=True):
        offset = 0
        for g in gradients[first : first + count]:
            width = g.numel() // g.shape[0]
            g.copy_((scale * update[:, offset : offset + width]).reshape(g.shape))
            offset += width
        first += count
    return scale


def kron_precondition_(
    gradients: list[Tensor],
    blocks: list[int],
    eigvecs_a: list[Tensor],
    eigvecs_g: list[Tensor],
    inverse_spectra: list[Tensor],
    kl_weights: Tensor | None = None,
) -> Tensor:
    """In place, per layer: ``V_i ← ν Q_G [(Q_Gᵀ V_i Q_A) ⊙ S_i] Q_Aᵀ``; returns ν.

    Layer i's ``V_i`` is its next ``blocks[i]`` gradients, each viewed as ``(d_G, width)``,
    side by side (a weight, then its bias); ``ν = min(1, 1 / √(Σ_i k_i ⟨V_i, ν⁻¹ result_i⟩))``
    with ``kl_weights`` k, else 1.

    Args:
        gradients: the blocks, ``(d_G, ...)`` each, any floating dtype; overwritten.
        blocks: L counts of consecutive gradient blocks per layer.
        eigvecs_a: L eigenvector matrices ``(d_A, d_A)``.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)``.
        inverse_spectra: L ``(d_G, d_A)`` matrices S_i (for a damped solve ``1 / (μ λᵀ + δ)``).
        kl_weights: ``(L,)`` or None.

    Returns:
        ν, a 0-d tensor in the eigenvectors' dtype.
    """
    solves = [
        lambda v, qa=qa, qg=qg, s=s: qg @ ((qg.T @ v @ qa) * s) @ qa.T
        for qa, qg, s in zip(eigvecs_a, eigvecs_g, inverse_spectra, strict=True)
    ]
    return _precondition_layers_(gradients, blocks, solves, eigvecs_a[0].dtype, kl_weights)


def kron_inverse_precondition_(
    gradients: list[Tensor],
    blocks: list[int],
    inverses_a: list[Tensor],
    inverses_g: list[Tensor],
    kl_weights: Tensor | None = None,
) -> Tensor:
    """In place, per layer: ``V_i ← ν G_i⁻¹ V_i A_i⁻¹`` (blocks and ν as :func:`kron_precondition_`); returns ν.

    Args:
        gradients: the blocks, ``(d_G, ...)`` each, any floating dtype; overwritten.
        blocks: L counts of consecutive gradient blocks per layer.
        inverses_a: L symmetric matrices ``(d_A, d_A)`` (damped inverses of the input factors).
        inverses_g: L symmetric matrices ``(d_G, d_G)``.
        kl_weights: ``(L,)`` or None.

    Returns:
        ν, a 0-d tensor in the inverses' dtype.
    """
    solves = [lambda v, a=a, g=g: g @ v @ a for a, g in zip(inverses_a, inverses_g, strict=True)]
    return _precondition_layers_(gradients, blocks, solves, inverses_a[0].dtype, kl_weights)


def ekfac_scales_(
    scales: list[Tensor],
    inputs: list[Tensor],
    output_grads: list[Tensor],
    eigvecs_a: list[Tensor],
    eigvecs_g: list[Tensor],
    weight: float = 1.0,
    decay: float = 1.0,
) -> None:
    """In place, for every layer: ``S <- decay S + weight Σ_{n,k} (Q_Gᵀ G_nkᵀ A_n Q_A)²`` (entrywise square).

    Args:
        scales: L float32/float64 tensors ``(d_G, d_A)``; with ``decay == 0`` their old
            content is ignored (NaN included).
        inputs: L tensors ``(N, T, d_A)`` (``(N, d_A)``: T = 1), each datum's inputs at its
            T locations, any floating dtype.
        output_grads: L tensors ``(N, K, T, d_G)`` (``(N, T, d_G)``: K = 1; ``(N, d_G)``:
            K = T = 1), K gradient columns per datum w.r.t. the layer's outputs.
        eigvecs_a: L ``(d_A, d_A)`` eigenvectors Q_A (columns), the scales' dtype.
        eigvecs_g: L ``(d_G, d_G)`` eigenvectors Q_G.
        weight: scale of the new sums.
        decay: decay of the old scales.
    """
    for s, a, g, q_a, q_g in zip(scales, inputs, output_grads, eigvecs_a, eigvecs_g, strict=True):
        a = (a if a.dim() == 3 else a.unsqueeze(1)).to(s.dtype)
        g = g.to(s.dtype)
        g = g.unsqueeze(1).unsqueeze(1) if g.dim() == 2 else g.unsqueeze(1) if g.dim() == 3 else g
        gradients = torch.einsum("nktg,nta->nkga", g, a)  # each datum's gradient G_nkᵀ A_n
        moments = (q_g.T @ gradients @ q_a).square().sum((0, 1))
        if decay == 0:
            s.copy_(weight * moments)
        else:
            s.mul_(decay).add_(moments, alpha=weight)


def damped_inverses(matrices: list[Tensor], shifts: Tensor) -> list[Tensor]:
    """``(M_i + s_i I)⁻¹`` for L symmetric matrices ``(d_i, d_i)`` and shifts ``(L,)``."""
    return [
        torch.linalg.inv(m + s.to(m.dtype) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
        for m, s in zip(matrices, shifts, strict=True)
    ]


def kron_logdet(eigvals_a: list[Tensor], eigvals_g: list[Tensor], scale: Tensor, delta: Tensor) -> Tensor:
    """``(L,)`` log-determinants ``Σ_ij log(s_l μ_j λ_i + δ_l)`` of each layer's P."""
    return torch.stack(
        [
            damped_eigenvalues(la, lg, scale[i], delta[i]).log().sum()
            for i, (la, lg) in enumerate(zip(eigvals_a, eigvals_g, strict=True))
        ]
    )


def kron_predictive_variance(
    inputs: list[Tensor],
    output_jacobians: list[Tensor | None],
    eigvecs_a: list[Tensor],
    eigvals_a: list[Tensor],
    eigvecs_g: list[Tensor],
    eigvals_g: list[Tensor],
    scale: Tensor,
    delta: Tensor,
    append_ones: list[bool],
    full_covariance: bool,
) -> Tensor:
    """GLM predictive (co)variance ``Σ_l J_l P_l⁻¹ J_lᵀ`` without forming ``J_l``.

    Layer l maps input ``a`` to pre-activation ``z = W â``; the network output's
    Jacobian w.r.t. ``z`` is ``B`` (C x d_G), so ``J_l = B ⊗ âᵀ`` and
    ``J P⁻¹ Jᵀ = Σ_ij (Q_Aᵀ â)_i² (B Q_G)_{:,j} (B Q_G)_{:,j}ᵀ / (s μ_j λ_i + δ)``.

    Args:
        inputs: L tensors ``(N, d_in)``.
        output_jacobians: L tensors ``(N, C, d_G)``, or None for the last layer
            (B = I, d_G = C).
        eigvecs_a: L eigenvector matrices ``(d_A, d_A)`` of the input factors.
        eigvals_a: L eigenvalue vectors ``(d_A,)``.
        eigvecs_g: L eigenvector matrices ``(d_G, d_G)`` of the output factors.
        eigvals_g: L eigenvalue vectors ``(d_G,)``.
        scale: ``(L,)`` factor scales.
        delta: ``(L,)`` prior precisions.
        append_ones: bias per layer.
        full_covariance: return ``(N, C, C)`` covariances, else ``(N, C)`` variances.

    Returns:
        ``(N, C, C)`` or ``(N, C)`` in the eigenvectors' dtype.
    """
    total = None
    for i, a in enumerate(inputs):
        qa, qg = eigvecs_a[i], eigvecs_g[i]
        a_rot = _with_ones(a.to(qa.dtype), append_ones[i]) @ qa  # (N, d_A)
        d = damped_eigenvalues(eigvals_a[i], eigvals_g[i], scale[i], delta[i])
        weights = a_rot.square() @ d.reciprocal().T  # (N, d_G)
        jac = output_jacobians[i]
        if jac is None:
            b_rot = qg.expand(a.shape[0], -1, -1)  # (N, C, d_G)
        else:
            b_rot = jac.to(qa.dtype) @ qg
        if full_covariance:
            term = torch.einsum("ncj,nj,nej->nce", b_rot, weights, b_rot)
        else:
            term = torch.einsum("ncj,nj->nc", b_rot.square(), weights)
        total = term if total is None else total + term
    return total
