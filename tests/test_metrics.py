"""fastlaplace.metrics against brute force and known cases."""

import itertools
import math

import pytest
import torch

from fastlaplace import metrics


def calibrated_predictions(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class predictions whose labels are drawn from the predicted probabilities."""
    p = torch.rand(n, generator=generator, dtype=torch.float64) * 0.5 + 0.5
    probs = torch.stack([p, 1 - p], dim=1)
    targets = (torch.rand(n, generator=generator, dtype=torch.float64) >= p).long()
    return probs, targets


def test_ece_of_calibrated_predictions_is_small(generator):
    probs, targets = calibrated_predictions(200_000, generator)
    assert metrics.expected_calibration_error(probs, targets) < 0.01


def test_ece_of_overconfident_predictions():
    # Always 90% confident, right half of the time: ECE = 0.4 exactly.
    probs = torch.tensor([[0.9, 0.1]] * 10)
    targets = torch.tensor([0, 1] * 5)
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(0.4)


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.65, 0.35], [0.3, 0.7]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 1])
    confidence, accuracy, counts = metrics.reliability_bins(probs, targets, n_bins=5)
    torch.testing.assert_close(counts, torch.tensor([0.0, 0, 1, 2, 1], dtype=torch.float64))
    torch.testing.assert_close(confidence, torch.tensor([0, 0, 0.55, 0.675, 0.95], dtype=torch.float64))
    torch.testing.assert_close(accuracy, torch.tensor([0, 0, 0, 1, 1], dtype=torch.float64))


def brute_force_auroc(negative, positive):
    pairs = list(itertools.product(negative.tolist(), positive.tolist()))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for n, p in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_count(seed):
    generator = torch.Generator().manual_seed(seed)
    # Integers so that ties occur, within and across the two groups.
    negative = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
    positive = torch.randint(2, 9, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
    assert metrics.auroc(negative.float(), positive.float()) == pytest.approx(brute_force_auroc(negative, positive))


def test_auroc_extremes():
    assert metrics.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert metrics.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert metrics.auroc(torch.ones(3), torch.ones(4)) == 0.5


def test_nll_accuracy_entropy():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    assert metrics.negative_log_likelihood(probs, targets) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    assert metrics.accuracy(probs, targets) == 1.0
    expected = torch.tensor([math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], dtype=torch.float64)
    torch.testing.assert_close(metrics.entropy(probs), expected)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="class indices"):
        metrics.expected_calibration_error(torch.rand(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        metrics.entropy(torch.rand(4))
    with pytest.raises(ValueError, match="at least one"):
        metrics.auroc(torch.tensor([]), torch.tensor([1.0]))
