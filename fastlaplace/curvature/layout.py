"""How a layer's weight sits in its ``[W | b]`` matrix, and how that matrix maps to the parameter vector.

Every layer's curvature is kept for the ``(d_out, d_in + bias)`` matrix ``[W | b]`` whose rows are
the output features. For all layers but one, W is the weight as stored, flattened after its first
dimension. HuggingFace transformers' ``Conv1D`` (GPT-2's attention and MLP projections) stores the
transpose of a Linear weight, ``(d_in, d_out)`` with ``y = x W + b``: its block is ``Wᵀ``, so that it
gets the Kronecker factors of a Linear layer, and its parameter vector (the row-major vec of the
stored weight, as ``named_parameters()`` holds it) is the column-major vec of that block.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn


def transposed_linear_type() -> type | None:
    """The ``Conv1D`` class of transformers, or None while transformers has not been imported.

    Looked up without importing transformers: a model holding a Conv1D has imported it already.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether the module is a transformers ``Conv1D``: a Linear layer with a ``(d_in, d_out)`` weight."""
    kind = transposed_linear_type()
    return kind is not None and isinstance(module, kind)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of the weight's part of the layer's ``[W | b]`` matrix (no copy).

    Linear ``(d_out, d_in)``, Conv2d ``(C_out, C_in kh kw)``, Conv1D ``(nf, d_in)``, Embedding
    ``(V, d)``, LayerNorm / BatchNorm ``(d, 1)``.
    """
    weight = module.weight
    if is_transposed_linear(module):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight[0].numel()


def weight_block(module: nn.Module) -> Tensor:
    """``(d_out, d_in)`` the weight as the ``W`` of ``[W | b]``: a view of the stored weight (transposed for Conv1D)."""
    weight = module.weight
    if is_transposed_linear(module):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def block_to_parameter(module: nn.Module, block: Tensor) -> Tensor:
    """``(*, weight.numel())``: ``(*, d_out, d_in)`` weight blocks in the stored weight's row-major order."""
    if is_transposed_linear(module):
        block = block.transpose(-1, -2)
    return block.flatten(-2)


def parameter_to_block(module: nn.Module, vector: Tensor) -> Tensor:
    """``(d_out, d_in)``: the inverse of :func:`block_to_parameter` for one ``(weight.numel(),)`` vector."""
    d_out, d_in = weight_shape(module)
    if is_transposed_linear(module):
        return vector.view(d_in, d_out).T
    return vector.view(d_out, d_in)
