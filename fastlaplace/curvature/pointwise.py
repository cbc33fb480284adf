"""Pointwise activations composed of several ops, backpropagated as one product per column.

A curvature pass sends K columns back through the same graph. An activation written as
a chain of elementwise ops in Python (Hugging Face's ``NewGELUActivation``, GPT-2's
``gelu_new``: eight nodes; ``FastGELUActivation``, ``QuickGELUActivation``) then costs K
backwards through the whole chain, each allocating and reading several full-size tensors.
Its Jacobian is diagonal, so during a curvature pass such a module's output is replaced
by the same values behind one node whose backward multiplies by the derivative: computed
on the first column (one backward of the chain with a column of ones), each further
column costs one product.

A module is collapsed only when the graph from its output back to its input is a chain of
:data:`ELEMENTWISE_NODES` of at least two nodes and the output has the input's shape: the
derivative is then exactly the diagonal the chain's backward applies (elementwise ops only
broadcast constants, never reduce, so every tensor on the chain has the input's shape).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fastlaplace.curvature.column_backward import graph_nodes

#: backward nodes of elementwise ops (the Jacobian of each w.r.t. its graph inputs is diagonal)
ELEMENTWISE_NODES = frozenset(
    {
        "AddBackward0",
        "AddBackward1",
        "SubBackward0",
        "SubBackward1",
        "RsubBackward0",
        "RsubBackward1",
        "MulBackward0",
        "MulBackward1",
        "DivBackward0",
        "DivBackward1",
        "NegBackward0",
        "PowBackward0",
        "PowBackward1",
        "TanhBackward0",
        "SigmoidBackward0",
        "ErfBackward0",
        "ExpBackward0",
        "LogBackward0",
        "SqrtBackward0",
        "RsqrtBackward0",
        "ReciprocalBackward0",
        "ReluBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "SoftplusBackward0",
        "MishBackward0",
        "ClampBackward1",
        "ClampMinBackward0",
        "ClampMaxBackward0",
    }
)


def elementwise_chain(output: Tensor, input: Tensor) -> bool:
    """Whether ``output`` is a function of ``input`` alone through at least two elementwise nodes, shape kept.

    Args:
        output: a module's output, in the graph.
        input: the module's one input.
    """
    if output.shape != input.shape or output.grad_fn is None or output is input:
        return False
    source = input.grad_fn

    def is_input(node) -> bool:  # the input's own node, or the accumulator of an input that is a leaf
        return node is source or (source is None and getattr(node, "variable", None) is input)

    count = 0
    for node in graph_nodes(output, stop=is_input):
        if node.name() not in ELEMENTWISE_NODES:
            return False
        count += 1
    return count >= 2


class _Pointwise:
    """A collapsed module's output in its own graph, and its derivative once computed."""

    def __init__(self, output: Tensor, input: Tensor) -> None:
        self.output: Tensor | None = output
        self.input: Tensor | None = input
        self.derivative: Tensor | None = None

    def times(self, column: Tensor) -> Tensor:
        """``column ⊙ f'(input)``; the first call backpropagates ones through the chain and frees it."""
        if self.derivative is None:
            ones = torch.ones((), dtype=self.output.dtype, device=self.output.device).expand_as(self.output)
            (self.derivative,) = torch.autograd.grad(self.output, self.input, ones)
            self.output = self.input = None
        return column * self.derivative


class _DiagonalBackward(torch.autograd.Function):
    """``f(x)`` with the backward ``column ⊙ f'(x)`` of a :class:`_Pointwise`."""

    @staticmethod
    def forward(ctx, input: Tensor, pointwise: _Pointwise) -> Tensor:
        ctx.pointwise = pointwise
        return pointwise.output.detach()

    @staticmethod
    def backward(ctx, column: Tensor) -> tuple[Tensor, None]:
        return ctx.pointwise.times(column), None


def _collapse(module: nn.Module, inputs: tuple, output) -> Tensor | None:
    if len(inputs) != 1 or not isinstance(output, Tensor) or not isinstance(inputs[0], Tensor):
        return None
    input = inputs[0]
    if not (input.requires_grad and input.is_floating_point() and elementwise_chain(output, input)):
        return None
    return _DiagonalBackward.apply(input, _Pointwise(output, input))


@contextmanager
def collapsed_pointwise_modules(model: nn.Module) -> Iterator[None]:
    """Within the block, each parameter-free leaf module of ``model`` whose forward is an elementwise chain collapses.

    Only for graphs that are backpropagated without ``create_graph``: the collapsed node's
    backward is not itself differentiable.
    """
    handles = [
        module.register_forward_hook(_collapse)
        for module in model.modules()
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
