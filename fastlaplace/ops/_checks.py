"""The argument checks the operator wrappers share: errors name the argument and the layer index."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def check_lengths(**lists: Sequence) -> int:
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per layer is needed in each list, got lengths {lengths}")
    return next(iter(lengths.values()))


def check_tensor(t: object, name: str, dims: Sequence[int] | int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and t.dim() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    return t


def check_accumulator(t: Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def check_device(tensors: Sequence[Tensor | None], names: Callable[[], Sequence[str]]) -> None:
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


def check_square(t: Tensor, size: int, name: str) -> None:
    if t.shape != (size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}), got {tuple(t.shape)}")


def check_square_matrices(matrices: Sequence[Tensor]) -> None:
    """Each ``matrices[i]`` a square float32/float64 tensor."""
    for i, m in enumerate(matrices):
        check_tensor(m, f"matrices[{i}]", 2)
        check_accumulator(m, f"matrices[{i}]")
        check_square(m, m.shape[0], f"matrices[{i}]")


def check_per_layer(t: object, count: int, name: str, nonnegative: bool) -> Tensor:
    check_tensor(t, name, 1)
    if t.shape[0] != count:
        raise ValueError(f"{name} must have one entry per layer ({count}), got shape {tuple(t.shape)}")
    # One reduction, and NaN fails it too (NaN >= 0 is false).
    if nonnegative and not torch.compiler.is_compiling() and not bool((t >= 0).all()):
        raise ValueError(f"{name} must be non-negative, got {t.tolist()}")
    return t


def check_eigenpairs(
    eigvecs_a: Sequence[Tensor],
    eigvals_a: Sequence[Tensor],
    eigvecs_g: Sequence[Tensor],
    eigvals_g: Sequence[Tensor],
    scale: Tensor,
    delta: Tensor,
) -> int:
    count = check_lengths(eigvecs_a=eigvecs_a, eigvals_a=eigvals_a, eigvecs_g=eigvecs_g, eigvals_g=eigvals_g)
    for i in range(count):
        for side, vecs, vals in (("a", eigvecs_a, eigvals_a), ("g", eigvecs_g, eigvals_g)):
            q = check_tensor(vecs[i], f"eigvecs_{side}[{i}]", 2)
            lam = check_tensor(vals[i], f"eigvals_{side}[{i}]", 1)
            check_accumulator(q, f"eigvecs_{side}[{i}]")
            check_square(q, lam.shape[0], f"eigvecs_{side}[{i}]")
            if lam.dtype != q.dtype:
                raise TypeError(f"eigvals_{side}[{i}] is {lam.dtype} but eigvecs_{side}[{i}] is {q.dtype}")
        if eigvecs_g[i].dtype != eigvecs_a[i].dtype:
            raise TypeError(f"eigvecs_g[{i}] is {eigvecs_g[i].dtype} but eigvecs_a[{i}] is {eigvecs_a[i].dtype}")
    check_per_layer(scale, count, "scale", nonnegative=True)
    check_per_layer(delta, count, "delta", nonnegative=True)
    return count


def check_preconditioned_layers(
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
    count = check_lengths(**{name_a: mats_a, name_g: mats_g, "blocks": blocks})
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
        check_accumulator(a, f"{name_a}[{i}]")
        check_square(a, d_a, f"{name_a}[{i}]")
        check_square(g, d_g, f"{name_g}[{i}]")
        if g.dtype != dtype or a.dtype != dtype:
            raise TypeError(f"layer {i}: {name_a} and {name_g} must all be {dtype}")
        width = 0
        for j in range(first, first + blocks[i]):
            block = check_tensor(gradients[j], f"gradients[{j}]")
            if block.dim() == 0 or block.shape[0] != d_g:
                raise ValueError(
                    f"gradients[{j}] must have {d_g} rows (layer {i}'s d_G), got shape {tuple(block.shape)}"
                )
            width += block.numel() // d_g
        if width != d_a:
            raise ValueError(f"layer {i}: its gradient blocks have {width} columns, its {name_a} {d_a}")
        first += blocks[i]
    if kl_weights is not None:
        check_per_layer(kl_weights, count, "kl_weights", nonnegative=False)
    lists = (("gradients", len(gradients)), (name_a, count), (name_g, count))
    check_device(
        [*gradients, *mats_a, *mats_g, kl_weights],
        lambda: [f"{name}[{i}]" for name, k in lists for i in range(k)] + ["kl_weights"],
    )
