"""Columns whose outer products give the loss Hessian (or its Fisher estimates) w.r.t. the outputs.

For every sample n the curvature of the loss w.r.t. the network output f_n (C values) is
written as ``Σ_k r_nk r_nkᵀ``; backpropagating the columns r_nk through the network gives
the output gradients of every layer. Losses follow laplace-torch: the summed cross-entropy
for classification and the summed ½‖f − y‖² for regression (σ² is applied by the
posterior, not here).

``"heteroscedastic_regression"``: the model outputs ``(N, 2C)``, the means μ then the
log-variances s = log σ² of C Gaussian targets, and the loss is the summed Gaussian
negative log-likelihood ``½ (y − μ)² e^{−s} + ½ s`` (without the constant ½ log 2π). Its
Hessian w.r.t. (μ, s) is not positive semi-definite; its expectation over y, the Fisher
``diag(e^{−s}, ½)``, is the GGN of the same model written in the Gaussian's natural
parameters, and is the curvature used here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastlaplace.curvature.memory import check_allocation

LIKELIHOODS = ("classification", "regression", "heteroscedastic_regression")
MODES = ("ggn", "mc", "ef")


def output_gradient_columns(
    output: Tensor,
    target: Tensor,
    likelihood: str,
    mode: str,
    generator: torch.Generator | None = None,
    mc_samples: int = 1,
) -> Tensor:
    """Columns ``r_nk`` with ``Σ_k r_nk r_nkᵀ`` the output curvature of sample n.

    Args:
        output: ``(N, C)`` network outputs (logits for classification; means then
            log-variances, ``C = 2 C_y``, for heteroscedastic regression).
        target: ``(N,)`` class indices (classification) or ``(N, C_y)`` targets (regression);
            only read by ``mode="ef"``.
        likelihood: one of :data:`LIKELIHOODS`.
        mode: ``"ggn"`` (exact: square-root columns of the loss Hessian, ``C − 1`` of them
            for classification, whose Hessian has rank ``C − 1``, else ``C``),
            ``"mc"`` (one gradient at labels sampled from the model, ``K = 1``) or ``"ef"``
            (one gradient at the true labels, ``K = 1``).
        generator: random source of ``mode="mc"``.
        mc_samples: ``mode="mc"`` only: S sampled gradients per datum, scaled by 1/√S so that
            their outer products average (``K = S``).

    Returns:
        ``(N, C, K)`` columns, detached, in the output's dtype (K as ``mode`` says, 1 for
        the Fisher estimates).
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mc_samples < 1 or (mc_samples != 1 and mode != "mc"):
        raise ValueError(f"mc_samples must be a positive count, and 1 unless mode='mc'; got {mc_samples}")
    output = output.detach()
    if output.dim() != 2:
        raise ValueError(f"the model's output must be (N, C), got shape {tuple(output.shape)}")
    if likelihood == "heteroscedastic_regression":
        return _gaussian_columns(output, target, mode, generator, mc_samples)
    if likelihood == "regression":
        if mode == "ggn":
            return torch.eye(output.shape[1], dtype=output.dtype, device=output.device).expand(output.shape[0], -1, -1)
        if mode == "mc":  # f - y with y ~ N(f, 1)
            shape = (*output.shape, mc_samples)
            noise = torch.randn(shape, dtype=output.dtype, device=output.device, generator=generator)
            return noise / -math.sqrt(mc_samples)
        return (output - target.to(output.dtype)).unsqueeze(-1)
    probs = torch.softmax(output, dim=-1)
    if mode == "ggn":
        check_allocation(
            "the (N, C, C − 1) Hessian-root columns of the softmax's exact GGN",
            (*output.shape, output.shape[1] - 1),
            output.dtype,
            "a last-layer Kron posterior computes its factor in closed form; else use curvature_mode='mc' "
            "or smaller batches",
        )
        return _softmax_hessian_root(probs)
    if mode == "mc":  # (N, S) labels
        labels = torch.multinomial(probs, mc_samples, replacement=mc_samples > 1, generator=generator)
    else:
        check_class_labels(target, output.shape[1])
        labels = target.unsqueeze(-1)
    one_hot = torch.nn.functional.one_hot(labels.long(), output.shape[1]).to(output.dtype).transpose(1, 2)
    return (probs.unsqueeze(-1) - one_hot) / math.sqrt(mc_samples)


def check_class_labels(labels: Tensor, classes: int) -> None:
    """Refuse ``(N,)`` class indices outside ``[0, classes)``, naming the range found."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(f"class labels must lie in [0, {classes}), got [{low}, {high}]")


def _softmax_hessian_root(probs: Tensor) -> Tensor:
    """``(N, C, C − 1)`` R with ``R Rᵀ = diag(p) − p pᵀ`` (``(N, 1, 1)`` zeros for one class).

    The Hessian ``diag(√p) (I − √p √pᵀ) diag(√p)`` annihilates 1, so C − 1 columns suffice:
    ``R = diag(√p) U`` with U the orthonormal basis of √p's complement given by the
    Householder reflection ``I − 2 v vᵀ / vᵀv``, ``v = √p + e_C``, that maps √p to −e_C
    (its first C − 1 columns). vᵀv = 2 + 2√p_C ≥ 2, so it is stable for every p. One
    column fewer to backpropagate and to multiply into the factors: 10% of the exact
    GGN's cost at C = 10, half of it for binary classification.
    """
    classes = probs.shape[-1]
    if classes == 1:
        return torch.zeros_like(probs).unsqueeze(-1)
    root = probs.sqrt()
    v = root.clone()
    v[:, -1] += 1
    basis = -2 * v.unsqueeze(-1) * (v[:, :-1] / (2 + 2 * root[:, -1:])).unsqueeze(-2)  # (N, C, C − 1)
    basis.diagonal(dim1=1, dim2=2).add_(1)
    return root.unsqueeze(-1) * basis


def split_heteroscedastic(output: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., N, 2C)`` outputs of a heteroscedastic regression as ``(..., N, C)`` means and log-variances."""
    if output.dim() < 2 or output.shape[-1] % 2:
        raise ValueError(
            "a heteroscedastic regression model must output (N, 2C): C means, then C log-variances; "
            f"got shape {tuple(output.shape)}"
        )
    return output.chunk(2, dim=-1)


def _gaussian_columns(
    output: Tensor, target: Tensor, mode: str, generator: torch.Generator | None, mc_samples: int
) -> Tensor:
    """Curvature columns of the Gaussian NLL in (μ, log σ²): the Fisher's root, or one sampled / true gradient."""
    mean, log_var = split_heteroscedastic(output)
    inverse_std = (-0.5 * log_var).exp()
    if mode == "ggn":  # diag(e^{-s}, ½) = R Rᵀ with R diagonal
        return torch.diag_embed(torch.cat([inverse_std, torch.full_like(log_var, 0.5**0.5)], dim=1))
    if mode == "mc":  # (N, C, S) standardised residuals of sampled targets
        z = torch.randn((*mean.shape, mc_samples), dtype=mean.dtype, device=mean.device, generator=generator)
    else:
        if target.shape != mean.shape:
            raise ValueError(f"targets must be {tuple(mean.shape)} for outputs {tuple(output.shape)}")
        z = ((target.to(mean.dtype) - mean) * inverse_std).unsqueeze(-1)
    # ∂/∂μ = −z e^{−s/2}, ∂/∂s = ½ (1 − z²) with z the standardised residual
    return torch.cat([-z * inverse_std.unsqueeze(-1), 0.5 * (1 - z.square())], dim=1) / math.sqrt(mc_samples)


def summed_negative_log_likelihood(
    output: Tensor, target: Tensor, likelihood: str, noise: Tensor | None = None
) -> Tensor:
    """The summed loss whose curvature :func:`output_gradient_columns` describes.

    Args:
        output: ``(N, C)`` network outputs.
        target: ``(N,)`` class indices or ``(N, C_y)`` regression targets.
        likelihood: one of :data:`LIKELIHOODS`.
        noise: regression only: a scalar or ``(C,)`` σ dividing the residuals (None: 1).

    Returns:
        A scalar: cross-entropy, ``½ Σ ((f − y)/σ)²``, or ``Σ ½ (y − μ)² e^{−s} + ½ s``.
    """
    if likelihood == "classification":
        return torch.nn.functional.cross_entropy(output, target, reduction="sum")
    if likelihood == "heteroscedastic_regression":
        mean, log_var = split_heteroscedastic(output)
        return 0.5 * ((target - mean).square() * (-log_var).exp() + log_var).sum()
    residual = output - target
    return 0.5 * (residual if noise is None else residual / noise).square().sum()
