"""What LayerNorm and RMSNorm layers scale by their weight, and the Hugging Face RMSNorm classes recognised by name."""

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
        eps = max(torch.finfo(output.dtype).eps, torch.finfo(torch.float32).eps)
        tolerance = 64 * eps * (1 + expected.abs())
        if output.shape == expected.shape and bool(((output - expected).abs() <= tolerance).all()):
            return
    raise ValueError(
        f"layer {name!r} ({type(module).__name__}) is taken for an RMSNorm by its name, but its output is not "
        "weight * x / rms(x) (a weight offset such as Gemma's (1 + weight), or another formula); its curvature is "
        "not supported: freeze it (requires_grad=False)"
    )
