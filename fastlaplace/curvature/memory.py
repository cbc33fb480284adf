"""Size checks before the large allocations of a fit or a predictive, so that they fail with a clear message.

A dense Kronecker factor of a 50k-output layer, the ``(N, C, C − 1)`` Hessian-root columns
of a 50k-class softmax or an ``(N, C, C)`` predictive covariance can each need tens of GB;
without a check the allocation fails late (out of memory) or inside LAPACK. Every such
allocation is estimated first and refused above :data:`MEMORY_LIMIT_GIB`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastlaplace.curvature.attention import through_projections
from fastlaplace.curvature.model_io import call_model

#: the largest single allocation (GiB) the fit and the predictive make before refusing; set it to allow more
MEMORY_LIMIT_GIB = 8.0
#: one pass of a fit holds about this many bytes in its graph and curvature columns (batches are split to fit)
CURVATURE_PASS_BYTES = 256 << 20


class AllocationTooLargeError(MemoryError):
    """An allocation was refused before it was made: it would exceed :data:`MEMORY_LIMIT_GIB`."""


def _gib(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size() / 2**30


def fits(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a tensor of ``shape`` elements of ``dtype`` stays within :data:`MEMORY_LIMIT_GIB`."""
    return _gib(shape, dtype) <= MEMORY_LIMIT_GIB


def check_allocation(what: str, shape: tuple[int, ...], dtype: torch.dtype, remedy: str) -> None:
    """Refuse an allocation of ``shape`` elements of ``dtype`` larger than :data:`MEMORY_LIMIT_GIB`.

    Args:
        what: what would be allocated, naming its layer (it starts the message).
        shape: the tensor's shape.
        dtype: its element type.
        remedy: the option that avoids the allocation (it ends the message).

    Raises:
        AllocationTooLargeError: with ``what``, the size in GiB, the limit and ``remedy``.
    """
    gib = _gib(shape, dtype)
    if gib > MEMORY_LIMIT_GIB:
        raise AllocationTooLargeError(
            f"{what} would need {gib:.1f} GiB ({tuple(shape)} {dtype}), more than "
            f"fastlaplace.curvature.memory.MEMORY_LIMIT_GIB = {MEMORY_LIMIT_GIB:g}; {remedy}"
        )


def pass_bytes_per_sample(
    model: nn.Module, x: Tensor | Mapping, modules: list[nn.Module], columns_held: int | None
) -> int:
    """An estimate of the bytes one sample holds during a curvature pass: its graph and its columns.

    One forward of the batch's first sample (the random state restored) measures the
    tensors its graph saves for the backward and the output of each of ``modules`` that is
    not the model's output (those are the ones a backward reaches); each of those holds
    ``columns_held`` columns at once, all ``C`` (the model's outputs) by default. 0 for a
    dict batch.
    """
    if not isinstance(x, Tensor):
        return 0
    outputs: list[Tensor] = []
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        saved[t.untyped_storage().data_ptr(), t.storage_offset()] = t.nbytes
        return t

    handles = [m.register_forward_hook(lambda m, i, out: outputs.append(out)) for m in modules]
    cuda = [x.device] if x.device.type == "cuda" else []
    try:  # the probe leaves the random state (dropout) as it found it
        with (
            torch.random.fork_rng(devices=cuda),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            through_projections(model, modules),
        ):
            logits = call_model(model, x[:1])
    finally:
        for handle in handles:
            handle.remove()
    inner = sum(out[:1].numel() * out.element_size() for out in outputs if out is not logits)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    graph = sum(size for (pointer, _), size in saved.items() if pointer not in parameters)
    return graph + (logits.shape[-1] if columns_held is None else columns_held) * inner
