"""Link approximations that turn a Gaussian over logits into class probabilities."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def probit(mean: Tensor, variance: Tensor) -> Tensor:
    """``(N, K)`` probit approximation ``softmax(μ / sqrt(1 + π σ² / 8))`` of E[softmax(f)]."""
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variance), dim=-1)


def sampled_softmax(mean: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
    """``(n_samples, N, C)`` softmax of logits drawn from N(mean, cov)."""
    jitter = 1e-10 * torch.eye(mean.shape[1], dtype=mean.dtype, device=mean.device)
    root = torch.linalg.cholesky(cov + jitter)
    noise = torch.randn((n_samples, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator)
    return torch.softmax(mean + (root @ noise.unsqueeze(-1)).squeeze(-1), dim=-1)


def laplace_bridge(mean: Tensor, cov: Tensor, normalise: bool = False) -> Tensor:
    """Class probabilities of the Dirichlet that the Laplace bridge matches to N(mean, cov).

    The softmax ignores a common shift of the logits, so the Gaussian is first conditioned
    on their sum being 0; the bridge then uses its diagonal:
    ``α_k = (1 − 2/K + e^{μ_k} Σ_l e^{−μ_l} / K²) / σ_k²``. With ``normalise`` the
    logits are rescaled so that the mean variance is ``2/K`` first.

    Args:
        mean: ``(N, K)`` logit means.
        cov: ``(N, K, K)`` logit covariances.
        normalise: the ``"bridge_norm"`` variant.

    Returns:
        ``(N, K)`` probabilities, the Dirichlet's mean.
    """
    row_sums = cov.sum(-1)  # Σ 1, (N, K)
    total = row_sums.sum(-1, keepdim=True)  # 1ᵀ Σ 1
    mean = mean - row_sums * mean.sum(-1, keepdim=True) / total
    variance = cov.diagonal(dim1=1, dim2=2) - row_sums.square() / total
    classes = mean.shape[-1]
    if normalise:
        level = variance.mean(-1, keepdim=True) / math.sqrt(classes / 2)
        mean, variance = mean / level.sqrt(), variance / level
    alpha = (1 - 2 / classes + mean.exp() * (-mean).exp().sum(-1, keepdim=True) / classes**2) / variance
    return alpha / alpha.sum(-1, keepdim=True)
