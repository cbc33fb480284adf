"""A ReLU module followed by 2-D max-pooling, backpropagated past the ReLU in one step per column.

Per curvature column, max-pooling's backward scatters the pooled gradient into a zeroed
full-size tensor, and the ReLU's backward then reads it and the ReLU's output and writes a
third full-size tensor. Only the window maxima receive a gradient, and at a maximum the
ReLU passes it exactly when the pooled value is positive (the maximum of ``relu(x)`` over
a window is ``relu`` of the maximum of ``x``; where it is 0, the ReLU's derivative there
is 0). So the pooled gradient is masked by ``pooled > 0`` (a quarter of the size, for 2x2
windows) and scattered straight to the ReLU's input, with max-pooling's own indices: the
same gradient, the ReLU's full-size backward gone (the benchmark CNN's Kron fit,
``Conv → ReLU → MaxPool2d`` twice and 9 columns per batch: 1.20 -> 0.96 s, alternated).

A ReLU whose output is used elsewhere too still gets those gradients through its own node;
an in-place ReLU (no tensor before it to attach to) or a functional ``relu`` is left as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: the autograd node of ``max_pool2d`` (it keeps the window maxima's indices as ``_saved_result1``)
MAX_POOL_NODE = "MaxPool2DWithIndicesBackward0"


class _Pooling:
    """One max-pooling as the fold needs it: its output, and its node (the window maxima's indices, the window)."""

    def __init__(self, output: Tensor) -> None:
        self.output = output
        self.node = output.grad_fn


class _MaxPoolOfRelu(torch.autograd.Function):
    """``max_pool2d(relu(x))`` with the backward ``scatter(column ⊙ [pooled > 0])`` to x."""

    @staticmethod
    def forward(ctx, input: Tensor, pooling: _Pooling) -> Tensor:
        node = pooling.node
        ctx.save_for_backward(input)
        ctx.positive = (pooling.output > 0).to(input.dtype)  # a product with a bool mask would convert it per column
        ctx.indices = node._saved_result1
        ctx.window = (
            node._saved_kernel_size,
            node._saved_stride,
            node._saved_padding,
            node._saved_dilation,
            node._saved_ceil_mode,
        )
        # Not an input returned as is: the model may change the result in place (``pooled += ...``).
        return pooling.output.detach()

    @staticmethod
    def backward(ctx, column: Tensor) -> tuple[Tensor, None]:
        (input,) = ctx.saved_tensors
        masked = column * ctx.positive
        return torch.ops.aten.max_pool2d_with_indices_backward(masked, input, *ctx.window, ctx.indices), None


@contextmanager
def relu_max_pool_folded(model: nn.Module) -> Iterator[None]:
    """Within the block, each ``nn.MaxPool2d`` of ``model`` that pools an ``nn.ReLU`` module's output is folded.

    Only for graphs that are backpropagated without ``create_graph``: the folded node's
    backward is not itself differentiable.
    """
    relu_inputs: dict = {}  # the ReLU output's node -> the ReLU's input, for this forward

    def remember(module: nn.Module, inputs: tuple, output) -> None:
        if not module.inplace and isinstance(output, Tensor) and output.grad_fn is not None:
            relu_inputs[output.grad_fn] = inputs[0]

    def fold(module: nn.Module, inputs: tuple, output) -> Tensor | None:
        if not isinstance(output, Tensor) or output.grad_fn is None or output.grad_fn.name() != MAX_POOL_NODE:
            return None
        source = relu_inputs.get(inputs[0].grad_fn)
        if source is None:
            return None
        return _MaxPoolOfRelu.apply(source, _Pooling(output))

    handles = [
        module.register_forward_hook(remember if isinstance(module, nn.ReLU) else fold)
        for module in model.modules()
        if isinstance(module, nn.ReLU | nn.MaxPool2d)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        relu_inputs.clear()
