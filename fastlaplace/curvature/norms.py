"""What LayerNorm and RMSNorm layers scale by their weight; the RMSNorm and LayerNorm2d classes recognised by name."""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: the name the error messages give Hugging Face's RMSNorm classes among the supported layers
RMS_NORM_LIKE_NAME = "transformers *RMSNorm (weight * x / rms(x))"


def is_rms_norm_like(module: nn.Module) -> bool:
    """Whether the module is a Hugging Face RMSNorm (``LlamaRMSNorm``, ``MistralRMSNorm``...): by its class name.

    Those classes are not ``nn.RMSNorm``: recognised by a name ending in ``RMSNorm``, one
    ``(d,)`` parameter ``weight`` and an ``eps`` or ``variance_epsilon``. That the output is
    ``weight * x / rms(x)`` (not, say, Gemma's ``(1 + weight) * ...``) is checked on every
    batch of a curvature pass (:func:`check_rms_norm_output`).
    """
    if isinstance(module, nn.RMSNorm) or not type(module).__name__.endswith("RMSNorm"):
        return False
    parameters = dict(module.named_parameters(recurse=False))
    return (
        list(parameters) == ["weight"] and parameters["weight"].dim() == 1 and isinstance(_rms_norm_eps(module), float)
    )


def _rms_norm_eps(module: nn.Module) -> float | None:
    """The ε of an RMSNorm (torch's, or a Hugging Face class's ``variance_epsilon``); None: torch's default."""
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def is_layer_norm_2d(module: nn.Module) -> bool:
    """Whether the module is a ``LayerNorm2d`` (torchvision's and timm's, in ConvNeXt): by its class name.

    A LayerNorm subclass over the channels of ``(N, C, H, W)`` images, written as the
    LayerNorm of the channels-last permutation, permuted back. That its output is exactly
    that is checked on every batch of a curvature pass (:func:`check_layer_norm_2d_output`).
    """
    return isinstance(module, nn.LayerNorm) and type(module).__name__ == "LayerNorm2d"


def layer_norm_2d(module: nn.LayerNorm, x: Tensor, affine: bool = True) -> Tensor:
    """``(N, H, W, C)`` the channels of ``(N, C, H, W)`` images ``x`` normalised (and scaled, shifted if ``affine``)."""
    weight, bias = (module.weight, module.bias) if affine else (None, None)
    return nn.functional.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, weight, bias, module.eps)


def check_layer_norm_2d_output(name: str, module: nn.LayerNorm, x: Tensor, output: Tensor) -> None:
    """Raise unless a ``LayerNorm2d``'s ``output`` is the LayerNorm of its channels (to rounding in its dtype)."""
    with torch.no_grad():
        if _close(output, layer_norm_2d(module, x).permute(0, 3, 1, 2), torch.finfo(output.dtype).eps):
            return
    raise ValueError(
        f"layer {name!r} ({type(module).__name__}) is taken for a LayerNorm over the channels of (N, C, H, W) "
        "images by its name, but its output is not that; its curvature is not supported: freeze it "
        "(requires_grad=False)"
    )


def normalised(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` normalised as a LayerNorm or an RMSNorm (``module``) does, before its scale: same shape."""
    if isinstance(module, nn.LayerNorm):
        return nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    return nn.functional.rms_norm(x, x.shape[-1:], eps=_rms_norm_eps(module))


def check_rms_norm_output(name: str, module: nn.Module, x: Tensor, output: Tensor) -> None:
    """Raise unless a Hugging Face RMSNorm's ``output`` is ``weight * x / rms(x)`` (to rounding in its dtype)."""
    with torch.no_grad():
        # Hugging Face normalises in float32 whatever the input's dtype, and casts back before the weight
        expected = module.weight * normalised(module, x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)
        if _close(output, expected, max(torch.finfo(output.dtype).eps, torch.finfo(torch.float32).eps)):
            return
    raise ValueError(
        f"layer {name!r} ({type(module).__name__}) is taken for an RMSNorm by its name, but its output is not "
        "weight * x / rms(x) (a weight offset such as Gemma's (1 + weight), or another formula); its curvature is "
        "not supported: freeze it (requires_grad=False)"
    )


def _close(output: Tensor, expected: Tensor, eps: float) -> bool:
    """Whether a norm layer's ``output`` is ``expected`` to 64 roundings of relative size ``eps``."""
    return output.shape == expected.shape and bool(((output - expected).abs() <= 64 * eps * (1 + expected.abs())).all())
