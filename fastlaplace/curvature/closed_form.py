"""The last layer of a softmax classifier: its exact output factor in closed form, without curvature columns.

For the layer that produces the logits, the exact-GGN output factor is
``G = Σ_n (diag(p_n) − p_n p_nᵀ)`` (every token a sample). The columns path builds
``(N, C, C − 1)`` Hessian roots and multiplies them (323 GB for 256 tokens of a
50k-class head); here G comes from the probabilities alone: ``diag(Σ_n p_n) − Pᵀ P``,
one GEMM for a dense factor, or a sketch update for a big one (:mod:`big_factors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlaplace.curvature.model_io import call_model
from fastlaplace.curvature.statistics import LayerStatistics, all_finite


@dataclass
class SoftmaxStatistics(LayerStatistics):
    """A last layer's batch for the closed-form output factor: no columns, the probabilities instead.

    Attributes:
        probabilities: ``(N, C)`` the softmax of the layer's output (detached).
        output_grads: ``(N, 0, C)``: no backpropagated columns.
    """

    probabilities: Tensor | None = None


def layer_forward(
    model: nn.Module, x: Tensor | Mapping, layer: nn.Module, grad: bool = False
) -> tuple[Tensor, Tensor, bool]:
    """Run the model once, keeping one layer's input.

    Args:
        model: the network; its output must be ``(N, C)``.
        x: a batch of inputs.
        layer: a module of ``model``.
        grad: keep the graph (for gradients of a predictive w.r.t. x).

    Returns:
        ``(output, inputs, is_output)``: the ``(N, C)`` output, the layer's ``(N, d_in)`` input
        and whether the layer's own output is the model's output (it is then the last layer).

    Raises:
        ValueError: if the model never calls the layer, its output is not ``(N, C)`` or not finite.
    """
    captured = []
    handle = layer.register_forward_hook(
        lambda module, inputs, output: captured.append((inputs[0], output, output._version))
    )
    try:
        with torch.set_grad_enabled(grad):
            output = call_model(model, x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError("the model's forward never called its last layer")
    if output.dim() != 2:
        raise ValueError(f"the model's output must be (N, C), got shape {tuple(output.shape)}")
    if not all_finite(output):
        raise ValueError("the model's output contains NaN or Inf")
    inputs, layer_output, version = captured[-1]
    return output, inputs, layer_output is output and output._version == version  # no in-place op after the layer


def softmax_statistics(
    model: nn.Module, x: Tensor | Mapping, name: str, layer: nn.Module
) -> tuple[Tensor, list[LayerStatistics]] | None:
    """One batch for the closed-form output factor of the last layer of a softmax classifier.

    Returns:
        ``(output, [statistics])``, the ``(N, C)`` output and the layer's
        :class:`SoftmaxStatistics`; None when the layer's output is not the model's output
        (the model transforms the logits after it: the columns path applies).
    """
    output, inputs, is_output = layer_forward(model, x, layer)
    if not is_output or inputs.dim() != 2:
        return None
    output = output.detach()
    empty = output.new_zeros(output.shape[0], 0, output.shape[1])
    probabilities = torch.softmax(output.to(torch.float64), dim=-1)
    return output, [SoftmaxStatistics(name, layer, inputs.detach(), empty, probabilities=probabilities)]


def softmax_hessian_sum(probabilities: Tensor) -> Tensor:
    """``(C, C)`` ``Σ_n (diag(p_n) − p_n p_nᵀ) = diag(Σ_n p_n) − Pᵀ P`` for ``(N, C)`` probabilities P."""
    total = -(probabilities.T @ probabilities)
    total.diagonal().add_(probabilities.sum(0))
    return total
