"""One batch through the model: each supported layer's inputs and output gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlaplace.curvature.loss import output_gradient_columns

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class LayerStatistics:
    """What one layer contributes for one batch.

    A Conv2d is a Linear layer applied at every output location to the patch that
    location sees (``weight.flatten(1)`` order), and a Linear layer on a sequence is
    applied at every token: all expose the same per-location view through
    :meth:`patches` and :meth:`location_grads` (one location for a plain Linear).

    Attributes:
        name: the layer's name in ``model.named_modules()``.
        module: the layer.
        inputs: its inputs (detached): ``(N, d_in)`` or ``(N, T, d_in)`` for Linear,
            ``(N, C, H, W)`` for Conv2d.
        output_grads: the curvature columns backpropagated to its pre-activation
            (detached): ``(N, K, d_out)`` or ``(N, K, T, d_out)`` for Linear,
            ``(N, K, C_out, H', W')`` for Conv2d.
    """

    name: str
    module: nn.Module
    inputs: Tensor
    output_grads: Tensor

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a trainable bias (the factor gets a ones column)."""
        return self.module.bias is not None and self.module.bias.requires_grad

    @property
    def is_conv(self) -> bool:
        """Whether the layer is a Conv2d."""
        return isinstance(self.module, nn.Conv2d)

    @property
    def shares_weights(self) -> bool:
        """Whether the weights are applied at several locations (Conv2d, or Linear on a sequence)."""
        return self.is_conv or self.inputs.dim() == 3

    @property
    def locations(self) -> int:
        """Output locations (or tokens) per sample; 1 for a Linear layer on vectors."""
        if self.is_conv:
            return self.output_grads[0, 0, 0].numel()
        return self.inputs.shape[1] if self.inputs.dim() == 3 else 1

    def patches(self) -> Tensor:
        """``(N, L, d_A)`` the input each output location sees, with the ones column of a bias."""
        if self.is_conv:
            m = self.module
            u = nn.functional.unfold(self.inputs, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        else:
            u = self.inputs if self.inputs.dim() == 3 else self.inputs.unsqueeze(1)
        if self.has_bias:
            u = torch.cat([u, u.new_ones(*u.shape[:2], 1)], dim=-1)
        return u

    def location_grads(self) -> Tensor:
        """``(N, K, L, d_out)`` the backpropagated columns at every output location."""
        if self.is_conv:
            return self.output_grads.flatten(3).transpose(2, 3)
        return self.output_grads if self.output_grads.dim() == 4 else self.output_grads.unsqueeze(2)

    def weight_gradients(self) -> Tensor:
        """``(N, K, d_out * d_A)``: each column as a gradient w.r.t. the row-major ``[W | b]``."""
        return torch.einsum(
            "nklo,nla->nkoa", self.location_grads(), self.patches().to(self.output_grads.dtype)
        ).flatten(2)


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with trainable parameters, all of a supported type, in model order.

    Raises:
        ValueError: if a module with trainable parameters is not supported, or if the
            model has no trainable supported layer.
    """
    layers = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise ValueError(
                f"layer {name!r} (Conv2d) needs groups=1, padding_mode='zeros' and numeric padding; got "
                f"groups={module.groups}, padding_mode={module.padding_mode!r}, padding={module.padding!r}"
            )
        if not isinstance(module, SUPPORTED_LAYERS):
            kinds = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) has trainable parameters but is not "
                f"supported; supported layers: {kinds} (set requires_grad=False to leave it out)"
            )
        layers.append((name, module))
    if not layers:
        raise ValueError("the model has no trainable layer of a supported type (nn.Linear, nn.Conv2d)")
    return layers


def last_layer(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's last module, which must be an nn.Linear producing the output."""
    name, module = list(model.named_modules())[-1]
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the last module {name!r} is a {type(module).__name__}, not an nn.Linear")
    return [(name, module)]


Layers = list[tuple[str, nn.Module]]


def _backpropagate_columns(
    model: nn.Module, x: Tensor, make_columns, layers: Layers | None
) -> tuple[Tensor, Layers, list[Tensor], list[Tensor]]:
    """Forward x, then backpropagate ``make_columns(output)`` (N, C, K) to the layers.

    Returns the detached output, the layers (all supported ones by default), their
    detached inputs ``(N, d_in)`` and the backpropagated columns ``(N, K, d_out)`` at
    their pre-activations.
    """
    layers = supported_layers(model) if layers is None else layers
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = (inputs[0], output)

        return hook

    handles = [module.register_forward_hook(capture(name)) for name, module in layers]
    try:
        with torch.enable_grad():
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not torch.isfinite(output).all():
        raise ValueError("the model's output contains NaN or Inf")
    for name, module in layers:
        a = captured[name][0]
        if a.dim() not in ((4,) if isinstance(module, nn.Conv2d) else (2, 3)):
            raise ValueError(
                f"layer {name!r} got an input of shape {tuple(a.shape)}; only (N, d_in) or (N, T, d_in) "
                "inputs (Linear) and (N, C, H, W) inputs (Conv2d) are supported"
            )
    columns = make_columns(output)  # (N, C, K)
    pre_activations = [captured[name][1] for name, _ in layers]
    grads = torch.autograd.grad(
        output, pre_activations, grad_outputs=columns.permute(2, 0, 1).contiguous(), is_grads_batched=True
    )
    for (name, _), grad in zip(layers, grads, strict=True):
        if not torch.isfinite(grad).all():
            raise ValueError(f"the output gradients of layer {name!r} contain NaN or Inf")
    inputs = [captured[name][0].detach() for name, _ in layers]
    return output.detach(), layers, inputs, [g.detach().transpose(0, 1) for g in grads]


def layer_statistics(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    likelihood: str,
    mode: str = "ggn",
    generator: torch.Generator | None = None,
    layers: Layers | None = None,
) -> tuple[Tensor, list[LayerStatistics]]:
    """Run one batch and collect every supported layer's inputs and output gradients.

    The K curvature columns of :func:`output_gradient_columns` are backpropagated in one
    batched backward pass (``is_grads_batched``), so a layer's GGN contribution is
    ``Σ_n Σ_k (g_nk g_nkᵀ) ⊗ (a_n a_nᵀ)`` in the row-major ``[W | b]`` order.

    Args:
        model: the network; its output must be ``(N, C)``.
        x: ``(N, ...)`` a batch of inputs.
        target: the batch's targets (see :func:`output_gradient_columns`).
        likelihood: ``"classification"`` or ``"regression"``.
        mode: ``"ggn"``, ``"mc"`` or ``"ef"``.
        generator: random source for ``mode="mc"``.
        layers: the ``(name, module)`` layers to collect; all supported ones by default.

    Returns:
        ``(output, statistics)``: the detached ``(N, C)`` output and one entry per layer.

    Raises:
        ValueError: on an unsupported layer, a layer input that is not ``(N, d_in)``, or
            NaN / Inf in the output or in a layer's output gradients (the layer is named).
    """
    output, layers, inputs, grads = _backpropagate_columns(
        model, x, lambda out: output_gradient_columns(out, target, likelihood, mode, generator), layers
    )
    stats = [LayerStatistics(n, m, a, g) for (n, m), a, g in zip(layers, inputs, grads, strict=True)]
    return output, stats


def output_jacobians(model: nn.Module, x: Tensor, layers: Layers | None = None) -> tuple[Tensor, list[LayerStatistics]]:
    """Every layer's input and the Jacobian ``B`` of the output w.r.t. its pre-activation.

    ``layers`` as in :func:`layer_statistics`.

    Returns:
        ``(output, statistics)`` with ``statistics[l].output_grads`` of shape
        ``(N, C, d_out)``: row c is the gradient of output c (one batched backward).
    """

    def identity(out):
        return torch.eye(out.shape[1], dtype=out.dtype, device=out.device).expand(out.shape[0], -1, -1)

    output, layers, inputs, grads = _backpropagate_columns(model, x, identity, layers)
    return output, [LayerStatistics(n, m, a, g) for (n, m), a, g in zip(layers, inputs, grads, strict=True)]
