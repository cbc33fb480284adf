"""Backpropagating K curvature columns at once (batched backward) or one at a time (plain backwards).

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under torch's legacy
vmap, which has batching rules for matrix products and elementwise ops but none for the
backward of convolutions, poolings, batch norm or padding (``convolution_backward``,
``max_pool2d_with_indices_backward``, ``native_batch_norm_backward``,
``constant_pad_nd``, ...). Each such op then falls back to a loop over the K columns
that concatenates their results at every node of the graph. For models with such modules
the columns are backpropagated instead by K plain backward passes over the retained graph:
the same ops on the same values (results identical), each with the library's batched
kernels, and no per-node concatenation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

#: modules whose backward has no batching rule in torch's legacy vmap (checked in tests/test_column_backward.py)
UNBATCHED_BACKWARD = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.padding._ConstantPadNd,
)


#: Backward nodes whose formula calls an op with no batching rule in torch's legacy vmap (each
#: checked in tests/test_column_backward.py; a node missing here costs speed, never a result).
UNBATCHED_NODES = frozenset(
    {
        "NativeLayerNormBackward0",
        "NativeGroupNormBackward0",
        "GeluBackward0",
        "TanhBackward0",
        "SiluBackward0",
        "EluBackward0",
        "SoftplusBackward0",
        "LeakyReluBackward0",
        "SoftmaxBackward0",
        "ScaledDotProductFlashAttentionForCpuBackward0",
    }
)
#: Rows of a layer's matrix products per column (samples × positions) from which batching the
#: columns gains nothing measurable: a model whose backward falls back then takes plain
#: backwards (GPT-2 with LoRA, 16 sequences of 32 tokens: fit 16% faster; an MLP on 128
#: samples keeps the batched backward, 10-35% faster there).
PLAIN_BACKWARD_ROWS = 256


class Target(NamedTuple):
    """A tensor of the graph as its producer returned it: the autograd edge it had then, and its version.

    An in-place op later in the forward (``ReLU(inplace=True)`` after a BatchNorm, ``+=``)
    moves the tensor itself onto that op's node: a backward to the tensor would give the
    gradient w.r.t. the op's result, one to :attr:`edge` gives it w.r.t. the value the
    producer returned.
    """

    tensor: Tensor
    edge: GradientEdge
    version: int

    @classmethod
    def of(cls, tensor: Tensor) -> Target:
        """``tensor`` as it is now (it must require grad)."""
        return cls(tensor, get_gradient_edge(tensor), tensor._version)

    def is_unchanged(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is this target's tensor, not modified in place since."""
        return tensor is self.tensor and tensor._version == self.version


def graph_nodes(output: Tensor, stop: Callable[[object], bool] = lambda node: False) -> Iterator[object]:
    """Each autograd node behind ``output`` once, depth first, not passing a node for which ``stop`` holds.

    A generator: a caller that has seen enough stops walking.
    """
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or stop(node):
            continue
        seen.add(node)
        yield node
        stack.extend(parent for parent, _ in node.next_functions)


def falls_back(output: Tensor) -> bool:
    """Whether the autograd graph behind ``output`` has a node of :data:`UNBATCHED_NODES`."""
    return any(node.name() in UNBATCHED_NODES for node in graph_nodes(output))


def batches_backward(model: nn.Module) -> bool:
    """Whether a batched backward of ``model`` avoids legacy-vmap fallbacks: no module of :data:`UNBATCHED_BACKWARD`.

    Ops called functionally inside ``forward`` are not seen; such a model still gets correct
    results from the batched backward, only slower.
    """
    return not any(isinstance(module, UNBATCHED_BACKWARD) for module in model.modules())


def backpropagate(
    output: Tensor, targets: Sequence[Target], columns: Tensor, batched: bool, create_graph: bool = False
) -> list[Tensor]:
    """The vector-Jacobian products of K columns with ``output`` w.r.t. each target.

    Args:
        output: ``(N, C)`` the model's output.
        targets: tensors of the graph that produced ``output`` (the layers' pre-activations), as
            their producers returned them.
        columns: ``(K, N, C)`` the columns.
        batched: one batched backward (``is_grads_batched``), or K plain ones.
        create_graph: keep the results differentiable.

    Returns:
        Per target, ``(K, *target.shape)`` the backpropagated columns.
    """
    if batched:
        grads = torch.autograd.grad(
            output,
            [t.edge for t in targets],
            columns,
            is_grads_batched=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        return [_zeros_if_unused(g, t.tensor, len(columns)) for g, t in zip(grads, targets, strict=True)]
    if create_graph:
        per_column = [_vjp(output, targets, column, retain_graph=True, create_graph=True) for column in columns]
        return [torch.stack(grads) for grads in zip(*per_column, strict=True)]
    # Written into place column by column: stacking lists of columns would hold every result twice.
    results = [target.tensor.new_empty(len(columns), *target.tensor.shape) for target in targets]
    for k, grads in enumerate(each_column(output, targets, columns)):
        for result, grad in zip(results, grads, strict=True):
            result[k] = grad
    return results


def each_column(output: Tensor, targets: Sequence[Target], columns: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Per column, in order, its vector-Jacobian products with ``output`` w.r.t. each target: one plain backward each.

    Args:
        output: ``(N, C)`` the model's output.
        targets: tensors of the graph that produced ``output``, as their producers returned them.
        columns: ``(K, N, C)`` the columns.

    Yields:
        K tuples of ``target.shape`` tensors; the graph is freed after the last.
    """
    for k, column in enumerate(columns):
        yield _vjp(output, targets, column, retain_graph=k + 1 < len(columns))


def _vjp(output: Tensor, targets: Sequence[Target], column: Tensor, **options) -> tuple[Tensor, ...]:
    """One column's vector-Jacobian products w.r.t. each target; zeros for a target the output does not depend on."""
    grads = torch.autograd.grad(output, [t.edge for t in targets], column, allow_unused=True, **options)
    return tuple(_zeros_if_unused(g, t.tensor) for g, t in zip(grads, targets, strict=True))


def _zeros_if_unused(grad: Tensor | None, target: Tensor, columns: int | None = None) -> Tensor:
    """``grad``, or the exact gradient of a target the output does not depend on: zeros.

    Such a target is the output of a layer whose result the model drops (BERT's pooler
    under a mean-pooled head): its curvature is 0. Batched: ``(columns, *target.shape)``.
    """
    if grad is not None:
        return grad
    return target.new_zeros(target.shape if columns is None else (columns, *target.shape))
