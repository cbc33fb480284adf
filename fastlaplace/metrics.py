"""Metrics of predictive uncertainty: calibration, likelihood and out-of-distribution detection."""

from __future__ import annotations

import torch
from torch import Tensor


def _check_classification(probs: Tensor, targets: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C) class probabilities, got shape {tuple(probs.shape)}")
    if targets.shape != probs.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be ({probs.shape[0]},) class indices, got shape {tuple(targets.shape)} {targets.dtype}"
        )


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose most probable class is the target.

    Args:
        probs: ``(N, C)`` class probabilities.
        targets: ``(N,)`` class indices.
    """
    _check_classification(probs, targets)
    return (probs.argmax(-1) == targets).double().mean().item()


def negative_log_likelihood(probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-probability of the targets (probabilities clamped at 1e-30).

    Args:
        probs: ``(N, C)`` class probabilities.
        targets: ``(N,)`` class indices.
    """
    _check_classification(probs, targets)
    return -probs.gather(1, targets.long().unsqueeze(1)).clamp_min(1e-30).log().double().mean().item()


def entropy(probs: Tensor) -> Tensor:
    """``(N,)`` entropy of each row of ``(N, C)`` class probabilities (an out-of-distribution score)."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C) class probabilities, got shape {tuple(probs.shape)}")
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Confidence and accuracy per bin of equal width in the top-class confidence.

    Bin b holds the samples with confidence in ``(b / n_bins, (b + 1) / n_bins]`` (the first
    bin also holds confidence 0).

    Args:
        probs: ``(N, C)`` class probabilities.
        targets: ``(N,)`` class indices.
        n_bins: number of bins over [0, 1].

    Returns:
        ``(confidence, accuracy, counts)``, each ``(n_bins,)`` (float64; confidence and
        accuracy are the bin's means, 0 for an empty bin).
    """
    _check_classification(probs, targets)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == targets).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(confidence))
    sum_confidence = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    sum_correct = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    occupied = counts.clamp_min(1)
    return sum_confidence / occupied, sum_correct / occupied, counts


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """``Σ_b (n_b / N) |accuracy_b − confidence_b|`` over equal-width confidence bins.

    Args:
        probs: ``(N, C)`` class probabilities.
        targets: ``(N,)`` class indices.
        n_bins: number of bins (see :func:`reliability_bins`).
    """
    confidence, accuracy_per_bin, counts = reliability_bins(probs, targets, n_bins)
    return ((counts / counts.sum()) * (accuracy_per_bin - confidence).abs()).sum().item()


def auroc(negative_scores: Tensor, positive_scores: Tensor) -> float:
    """Area under the ROC curve of telling positives from negatives by a higher score.

    The probability that a random positive scores above a random negative, ties counted
    as one half (the Mann–Whitney U statistic over ``n_pos · n_neg``), from average ranks.

    Args:
        negative_scores: ``(N_neg,)`` scores of the negatives (e.g. in-distribution data).
        positive_scores: ``(N_pos,)`` scores of the positives (e.g. out-of-distribution data).
    """
    if negative_scores.dim() != 1 or positive_scores.dim() != 1:
        raise ValueError(
            f"scores must be 1-D, got shapes {tuple(negative_scores.shape)} and {tuple(positive_scores.shape)}"
        )
    if negative_scores.numel() == 0 or positive_scores.numel() == 0:
        raise ValueError("auroc needs at least one negative and one positive score")
    scores = torch.cat([negative_scores, positive_scores]).double()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf")
    _, which, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Ranks start at 1; tied values share the mean of the ranks they occupy.
    below = torch.cumsum(counts, 0) - counts
    mean_rank = below.double() + (counts.double() + 1) / 2
    n_neg, n_pos = negative_scores.numel(), positive_scores.numel()
    rank_sum = mean_rank[which[n_neg:]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
