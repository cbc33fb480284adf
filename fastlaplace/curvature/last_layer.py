"""A model seen from its last layer: features, an optional reduction over tokens, the last Linear layer.

laplace-torch's ``last_layer_name`` and ``feature_reduction`` (sequence models): the
posterior covers the named Linear layer applied to the features it receives, reduced
over the token dimension first when asked. A dict input's ``attention_mask`` (HuggingFace
style, 1 for tokens and 0 for padding) restricts every reduction to the tokens: the first and
the last token with mask 1 (the last real token of a right-padded batch, where HuggingFace's
sequence classifiers read their logits), or their average.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastlaplace.curvature.model_io import check_deterministic, model_arguments
from fastlaplace.curvature.statistics import check_plain_forward

FEATURE_REDUCTIONS = ("pick_first", "pick_last", "average")


class _FeaturesCaptured(Exception):
    """Stops the forward pass once the last layer's input is known."""


class LastLayerModel(nn.Module):
    """``x ↦ layer(reduce(features(x)))`` with the features the named layer gets inside ``model``.

    The model's forward stops at the layer; what the model does after it is not part of the
    output (as laplace-torch's feature extractor).

    Args:
        model: the network.
        layer_name: the name of an ``nn.Linear`` in ``model.named_modules()``.
        feature_reduction: ``None``, or for ``(N, T, d)`` features ``"pick_first"``,
            ``"pick_last"`` or ``"average"`` over T (over the tokens an ``attention_mask`` keeps).
    """

    def __init__(self, model: nn.Module, layer_name: str, feature_reduction: str | None = None) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        if layer_name not in modules:
            linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"last_layer_name={layer_name!r} is not a module of the model; its Linear layers: {linear}"
            )
        _check_last_layer(layer_name, modules[layer_name], f"last_layer_name={layer_name!r}")
        if feature_reduction not in (None, *FEATURE_REDUCTIONS):
            raise ValueError(
                f"feature_reduction must be None or one of {FEATURE_REDUCTIONS}, got {feature_reduction!r}"
            )
        self.model, self.layer_name, self.feature_reduction = model, layer_name, feature_reduction

    @property
    def layer(self) -> nn.Linear:
        """The named last layer, reached through ``model``.

        Not registered a second time as a submodule: ``torch.func.functional_call`` (the sampled
        predictive) would swap in the sampled weights under one name and never restore the other.
        """
        return self.model.get_submodule(self.layer_name)

    def features(self, x: Tensor | Mapping) -> Tensor:
        """``(N, d)`` (or ``(N, T, d)`` without a reduction): what the layer receives, reduced."""
        captured = []

        def stop(module, args):
            captured.append(args[0])
            raise _FeaturesCaptured

        check_deterministic(self.model)
        handle = self.layer.register_forward_pre_hook(stop)
        try:
            args, kwargs = model_arguments(self.model, x)
            self.model(*args, **kwargs)
        except _FeaturesCaptured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ValueError("the model's forward never called its last layer")
        features = captured[0]
        if self.feature_reduction is None:
            return features
        if features.dim() != 3:
            raise ValueError(
                f"feature_reduction={self.feature_reduction!r} needs (N, T, d) features, got {tuple(features.shape)}"
            )
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        return reduce_tokens(features, self.feature_reduction, mask)

    def forward(self, x: Tensor | Mapping) -> Tensor:
        """``(N, C)`` the last layer's output on the (reduced) features."""
        features = self.features(x)
        if features.dim() > 2:
            raise ValueError(
                f"the last layer {self.layer_name!r} gets features of shape {tuple(features.shape)}, one per token; "
                "its posterior needs one per sample: feature_reduction='pick_last' (the last real token, as a "
                "Hugging Face sequence classifier picks), 'pick_first' or 'average'"
            )
        return self.layer(features)


def reduce_tokens(features: Tensor, reduction: str, mask: Tensor | None = None) -> Tensor:
    """``(N, d)`` features of ``(N, T, d)`` token features, over the tokens ``mask`` keeps (all without one).

    Args:
        features: ``(N, T, d)``.
        reduction: ``"pick_first"``, ``"pick_last"`` or ``"average"``.
        mask: ``(N, T)`` attention mask, nonzero for the tokens, zero for padding.

    Raises:
        ValueError: for a mask that is not ``(N, T)``, or a sample without a token.
    """
    if mask is None:
        if reduction == "average":
            return features.mean(1)
        return features[:, 0 if reduction == "pick_first" else -1]
    if mask.shape != features.shape[:2]:
        raise ValueError(
            f"the attention_mask has shape {tuple(mask.shape)}, not (N, T) = {tuple(features.shape[:2])} of the "
            "last layer's token features"
        )
    keep = mask != 0
    if not bool(keep.any(1).all()):
        raise ValueError("the attention_mask keeps no token of some sample")
    if reduction == "average":
        weights = keep.to(features.dtype).unsqueeze(-1)
        return (features * weights).sum(1) / weights.sum(1)
    positions = torch.arange(features.shape[1], device=features.device).expand_as(keep)
    if reduction == "pick_first":  # the smallest kept position
        chosen = torch.where(keep, positions, features.shape[1]).amin(1)
    else:  # the largest one: the last real token of a right-padded sequence
        chosen = torch.where(keep, positions, -1).amax(1)
    return features[torch.arange(features.shape[0], device=features.device), chosen]


def last_layer(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's last module, which must be a trainable nn.Linear producing the output.

    That it produces the output is checked when the model runs (``output_layer`` of
    :func:`~fastlaplace.curvature.statistics.backpropagate_columns`).
    """
    name, module = list(model.named_modules())[-1]
    _check_last_layer(name, module, f"the last module {name!r}")
    return [(name, module)]


def _check_last_layer(name: str, module: nn.Module, label: str) -> None:
    """Refuse a last layer that is not a plain, trainable nn.Linear; ``label`` says how it was chosen."""
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{label} is a {type(module).__name__}, not an nn.Linear; name the last layer with last_layer_name"
        )
    if not module.weight.requires_grad:
        raise ValueError(
            f"{label} has a frozen weight (requires_grad=False); the last-layer posterior covers a trainable "
            "layer: unfreeze it"
        )
    check_plain_forward(name, module)
