"""Columns whose outer products give the loss Hessian (or its Fisher estimates) w.r.t. the outputs.

For every sample n the curvature of the loss w.r.t. the network output f_n (C values) is
written as ``Σ_k r_nk r_nkᵀ``; backpropagating the columns r_nk through the network gives
the output gradients of every layer. Losses follow laplace-torch: the summed cross-entropy
for classification and the summed ½‖f − y‖² for regression (σ² is applied by the
posterior, not here).
"""

from __future__ import annotations

import torch
from torch import Tensor

LIKELIHOODS = ("classification", "regression")
MODES = ("ggn", "mc", "ef")


def output_gradient_columns(
    output: Tensor,
    target: Tensor,
    likelihood: str,
    mode: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Columns ``r_nk`` with ``Σ_k r_nk r_nkᵀ`` the output curvature of sample n.

    Args:
        output: ``(N, C)`` network outputs (logits for classification).
        target: ``(N,)`` class indices (classification) or ``(N, C)`` targets (regression);
            only read by ``mode="ef"``.
        likelihood: ``"classification"`` or ``"regression"``.
        mode: ``"ggn"`` (exact: ``K = C`` square-root columns of the loss Hessian),
            ``"mc"`` (one gradient at labels sampled from the model, ``K = 1``) or ``"ef"``
            (one gradient at the true labels, ``K = 1``).
        generator: random source of ``mode="mc"``.

    Returns:
        ``(N, C, K)`` columns, detached, in the output's dtype.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    output = output.detach()
    if output.dim() != 2:
        raise ValueError(f"the model's output must be (N, C), got shape {tuple(output.shape)}")
    if likelihood == "regression":
        if mode == "ggn":
            return torch.eye(output.shape[1], dtype=output.dtype, device=output.device).expand(output.shape[0], -1, -1)
        if mode == "mc":
            noise = torch.randn(output.shape, dtype=output.dtype, device=output.device, generator=generator)
            return (-noise).unsqueeze(-1)  # f - y with y ~ N(f, 1)
        return (output - target.to(output.dtype)).unsqueeze(-1)
    probs = torch.softmax(output, dim=-1)
    if mode == "ggn":
        # diag(p) - p pᵀ = R Rᵀ with R = diag(√p) - p √pᵀ, as Σ p = 1.
        root = probs.sqrt()
        return torch.diag_embed(root) - probs.unsqueeze(-1) * root.unsqueeze(-2)
    if mode == "mc":
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        labels = target
    one_hot = torch.nn.functional.one_hot(labels.long(), output.shape[1]).to(output.dtype)
    return (probs - one_hot).unsqueeze(-1)
